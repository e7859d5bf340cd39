"""milora-train: fine-tune a MiLoRA (or plain LoRA) adapter. A thin layer over
milora.train.api.train_adapter; every flag maps to a MiloraConfig or TrainConfig field.

    milora-train --base smollm2 --task arc_e --out adapters/arc --rank 8 --max-steps 200
    milora-train --base ./my-llama --data train.jsonl --out adapters/mine --config run.json
    milora-train ... --resume            continue an interrupted run from out/checkpoint

--config FILE: JSON {"adapter": {MiloraConfig fields}, "train": {TrainConfig fields}};
flags given on the command line override it. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from milora.cli_errors import ArgumentParser, cli_main, positive
from milora.errors import ConfigError, UsageError
from milora.format.jsonfile import read_json

# flag dest -> MiloraConfig field
ADAPTER_FLAGS = {"rank": "rank", "alpha": "alpha", "top_k": "top_k", "pooler": "pooler", "activation": "activation",
                 "gate_mode": "gate_mode", "lb_loss": "lb_loss", "lb_coef": "lb_coef", "dropout": "dropout",
                 "target_modules": "target_modules"}
# flag dest -> TrainConfig field
TRAIN_FLAGS = {"lr": "lr", "weight_decay": "weight_decay", "warmup_ratio": "warmup_ratio", "epochs": "epochs",
               "max_steps": "max_steps", "batch_size": "batch_size", "grad_accum": "grad_accum",
               "max_grad_norm": "max_grad_norm", "eval_every": "eval_every", "patience": "patience",
               "seed": "seed", "max_length": "max_length"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="milora-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--base", required=True, help="base model directory (Hugging Face), or 'smollm2'")
    p.add_argument("--out", required=True, help="output adapter directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="built-in task: arc_e, arc_c, boolq, obqa, piqa, gsm8k, gsm_symbolic")
    src.add_argument("--data", help="JSONL file: {prompt, response} or {messages: [...]} per line")
    p.add_argument("--dev-data", help="JSONL dev file (default: the task's dev split, or 10%% of --data)")
    p.add_argument("--train-limit", type=int, help="use only the first N training examples")
    p.add_argument("--dev-limit", type=int, help="use only the first N dev examples")
    p.add_argument("--config", help="JSON file with 'adapter' and 'train' sections")
    a = p.add_argument_group("adapter (MiloraConfig)")
    a.add_argument("--rank", type=int)
    a.add_argument("--alpha", type=float)
    a.add_argument("--top-k", type=int)
    a.add_argument("--lora", action="store_true", help="plain LoRA: no router, every target module always on")
    a.add_argument("--target-modules", nargs="+")
    a.add_argument("--pooler")
    a.add_argument("--activation")
    a.add_argument("--gate-mode")
    a.add_argument("--lb-loss")
    a.add_argument("--lb-coef", type=float)
    a.add_argument("--dropout", type=float)
    a.add_argument("--fp16", action="store_true", help="save LoRA matrices as float16 (routers stay float32)")
    t = p.add_argument_group("training (TrainConfig)")
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--warmup-ratio", type=float)
    t.add_argument("--epochs", type=float)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--max-grad-norm", type=float)
    t.add_argument("--eval-every", type=int)
    t.add_argument("--patience", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--max-length", type=int)
    t.add_argument("--no-chat", action="store_true", help="feed prompts raw, without the chat template")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def read_config_file(path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if path is None:
        return {}, {}
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist; expected a JSON file. Fix: check the --config path")
    data = read_json(path, ConfigError, 'write it as {"adapter": {...}, "train": {...}}', "a config file")
    unknown = sorted(set(data) - {"adapter", "train"})
    if unknown:
        raise ConfigError(f"config file {path}: unexpected top-level keys {unknown}; expected 'adapter' and 'train'")
    sections = data.get("adapter", {}), data.get("train", {})
    if not all(isinstance(x, dict) for x in sections):
        raise ConfigError(f"config file {path}: 'adapter' and 'train' must be JSON objects of option: value")
    return dict(sections[0]), dict(sections[1])


def configs_from_args(args: argparse.Namespace):
    from milora.format.config import MiloraConfig
    from milora.train.loop import TrainConfig

    adapter, training = read_config_file(args.config)
    adapter.update({f: getattr(args, d) for d, f in ADAPTER_FLAGS.items() if getattr(args, d) is not None})
    training.update({f: getattr(args, d) for d, f in TRAIN_FLAGS.items() if getattr(args, d) is not None})
    if args.lora:
        if args.top_k is not None:
            raise UsageError(f"--top-k {args.top_k} contradicts --lora: a plain LoRA adapter has no router and "
                             "switches every target module on; expected one of them. Fix: drop --top-k, or drop "
                             "--lora to train MiLoRA")
        adapter["routed"] = False
        adapter["top_k"] = len(adapter.get("target_modules") or range(7))
    if args.no_chat:
        training["chat"] = False
    try:
        return MiloraConfig(**adapter), TrainConfig.from_dict(training)
    except TypeError as exc:  # an unknown key in the config file's adapter section
        raise ConfigError(f"adapter options: {exc}") from None


@cli_main("milora-train")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("train_limit", "dev_limit", "max_steps", "batch_size", "grad_accum", "eval_every", "patience",
                 "max_length"):
        positive("--" + flag.replace("_", "-"), getattr(args, flag))
    import torch

    from milora.train.api import train_adapter

    adapter, training = configs_from_args(args)
    result = train_adapter(args.base, args.out, adapter, training, task=args.task, data=args.data,
                           dev_data=args.dev_data, train_limit=args.train_limit, dev_limit=args.dev_limit,
                           resume=args.resume, progress=not args.no_progress,
                           save_dtype=torch.float16 if args.fp16 else None)
    best = f", best dev loss {result.best_dev_loss:.4f} at step {result.best_step}" if result.best_dev_loss else ""
    stop = " (early stop)" if result.stopped_early else ""
    print(f"trained {result.steps} steps{stop}{best}; adapter in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
