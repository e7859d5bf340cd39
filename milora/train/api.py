"""The Python API the milora-train and milora-eval CLIs are thin layers over.

    train_adapter(base="smollm2", out_dir="adapters/arc", task="arc_e",
                  adapter=MiloraConfig(rank=8, alpha=16), train_config=TrainConfig(max_steps=100))
    evaluate_adapter(base="smollm2", adapter_dir="adapters/arc", task="arc_e", split="test")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from milora.errors import ConfigError, DataError, MiloraError
from milora.format.config import MiloraConfig
from milora.train.data import Example, load_task, read_jsonl
from milora.train.eval import EvalResult, evaluate
from milora.train.loop import TrainConfig, TrainResult, train

SMOLLM2 = "smollm2"


def resolve_base(base: str | Path) -> Path:
    """A base model directory; the name 'smollm2' means the packaged SmolLM2-135M-Instruct."""
    if str(base) == SMOLLM2:
        from milora.assets import smollm2_dir

        return smollm2_dir()
    path = Path(base)
    if not (path / "config.json").is_file():
        raise MiloraError(f"base model {path} is not a Hugging Face model directory (no config.json); give a "
                          f"directory saved with save_pretrained, or '{SMOLLM2}' for the packaged SmolLM2")
    return path


def load_base(base: str | Path):
    """(model, tokenizer) from a base directory, float32, eval mode."""
    from transformers import AutoTokenizer

    from milora.model.load import load_base_model

    path = resolve_base(base)
    return load_base_model(path, "float32", ConfigError, "base model"), AutoTokenizer.from_pretrained(path)


def dataset(task: str | None = None, data: str | Path | None = None, split: str = "train",
            limit: int | None = None, dev_percent: int = 10) -> list[Example]:
    """Examples of a built-in task's split, or of a JSONL file. A JSONL file without a separate
    dev file is split by a hash of each line's position: `dev_percent` percent go to 'dev'."""
    if (task is None) == (data is None):
        raise DataError("give exactly one of a built-in task name or a JSONL data file")
    if task is not None:
        return load_task(task, split, limit)
    items = read_jsonl(data)
    if split in ("dev", "train") and dev_percent > 0:
        dev = [e for i, e in enumerate(items) if _in_dev(i, dev_percent)]
        rest = [e for i, e in enumerate(items) if not _in_dev(i, dev_percent)]
        items = dev if split == "dev" else rest
    return items[:limit] if limit is not None else items


def _in_dev(i: int, percent: int) -> bool:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"jsonl-dev\0{i}".encode()).digest()[:8], "big") % 100 < percent


def train_adapter(base: str | Path, out_dir: str | Path, adapter: MiloraConfig, train_config: TrainConfig, *,
                  task: str | None = None, data: str | Path | None = None, dev_data: str | Path | None = None,
                  train_limit: int | None = None, dev_limit: int | None = None, resume: bool = False,
                  progress: bool = True, save_dtype: torch.dtype | None = None) -> TrainResult:
    """Train a MiLoRA (or, with adapter.routed=False, plain LoRA) adapter on a base model and
    write the best one to out_dir (format v1)."""
    from milora.model.model import MiloraModel

    # With a separate dev file every line of --data trains; otherwise a hashed 10% is held out.
    train_data = dataset(task, data, "train", train_limit, dev_percent=0 if dev_data is not None else 10)
    if dev_data is not None:
        dev = read_jsonl(dev_data)[:dev_limit] if dev_limit is not None else read_jsonl(dev_data)
    else:
        dev = dataset(task, data, "dev", dev_limit)
    model, tok = load_base(base)
    torch.manual_seed(train_config.seed)  # the adapter's initialisation follows the run's seed
    milora = MiloraModel(model, adapter)
    result = train(milora, tok, train_data, dev, train_config, out_dir, resume=resume, progress=progress)
    if save_dtype is not None:
        # Re-save the kept (best) adapter in the smaller dtype (routers stay float32), loaded
        # into the model already in memory rather than into a second copy of the base.
        from milora.format.adapter import read_adapter

        _, _, tensors = read_adapter(out_dir)
        milora.load_adapter_state_dict(tensors, where=str(out_dir))
        milora.save_adapter(out_dir, dtype=save_dtype)
    return result


@dataclass
class EvalReport:
    task: str
    split: str
    adapter: str | None
    result: EvalResult

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"task": self.task, "split": self.split, "adapter": self.adapter, "accuracy": r.accuracy,
                "ci95": [r.ci_low, r.ci_high], "n": r.n, "correct": r.correct}


def load_for_eval(base: str | Path, adapter_dir: str | Path | None):
    from milora.model.model import MiloraModel

    model, tok = load_base(base)
    if adapter_dir is not None:
        model = MiloraModel.from_pretrained(model, adapter_dir).eval()
    return model, tok


def evaluate_adapter(base: str | Path, adapter_dir: str | Path | None = None, *, task: str | None = None,
                     data: str | Path | None = None, split: str = "test", limit: int | None = None,
                     chat: bool = True, norm: str = "char", max_new_tokens: int = 256,
                     progress: bool = True) -> EvalReport:
    """Accuracy of the base model (adapter_dir None), a LoRA or a MiLoRA adapter on a split."""
    examples = dataset(task, data, split if task else "all", limit, dev_percent=0)
    model, tok = load_for_eval(base, adapter_dir)
    result = evaluate(model, tok, examples, chat=chat, progress=progress, max_new_tokens=max_new_tokens, norm=norm)
    return EvalReport(task or str(data), split if task else "file", str(adapter_dir) if adapter_dir else None, result)


def write_json(obj: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")
