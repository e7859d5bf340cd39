"""The training loop: AdamW with warm-up and linear decay, gradient accumulation and clipping,
dev loss every N steps, early stopping with the best adapter kept, exact resume.

Determinism: the order of micro-batches is a pure function of (seed, epoch), so a run is
described by its optimizer step alone; a checkpoint stores the step, the adapter, the
optimizer and scheduler states and the torch RNG (dropout, noisy gating). Resuming from it
continues exactly where the interrupted run was (tested: same adapter as an uninterrupted run).

Files under out_dir:
    milora_config.json, milora_adapter.safetensors   the best adapter (lowest dev loss)
    checkpoint/                                      the latest state, for --resume
    train_log.json                                   config, per-eval history, result
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from milora.errors import TrainingError
from milora.train.data import Example
from milora.train.encode import IGNORE, Row, collate, encode, pad_id_of

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train_log.json"


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. Steps are optimizer steps (each of grad_accum micro-batches
    of batch_size rows). max_steps, if set, overrides epochs. eval_every: dev loss every N
    steps; patience: stop after N evaluations without improving by more than min_delta."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    eval_every: int = 50
    patience: int = 10
    min_delta: float = 0.0
    seed: int = 0
    max_length: int = 512
    chat: bool = True  # wrap prompts in the tokenizer's chat template when it has one
    dev_batch_size: int = 16

    def __post_init__(self) -> None:
        checks = [("lr", self.lr >= 0), ("batch_size", self.batch_size >= 1), ("grad_accum", self.grad_accum >= 1),
                  ("eval_every", self.eval_every >= 1), ("patience", self.patience >= 1),
                  ("warmup_ratio", 0 <= self.warmup_ratio < 1), ("max_length", self.max_length >= 2),
                  ("epochs", self.epochs > 0), ("max_grad_norm", self.max_grad_norm > 0),
                  ("max_steps", self.max_steps is None or self.max_steps >= 1)]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise TrainingError("invalid training option(s): " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainingError(f"unknown training option(s) {unknown}; known: {', '.join(sorted(names))}")
        return cls(**data)


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including before a resume)
    best_dev_loss: float | None
    best_step: int | None
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per dev evaluation
    train_losses: list[float] = field(default_factory=list)  # per optimizer step (this process)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = math.ceil(n_train / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def micro_batch(rows: list[Row], cfg: TrainConfig, index: int) -> list[Row]:
    """Micro-batch number `index` of the run: epochs of a seeded permutation, cut in batches
    (the last batch of an epoch may be short)."""
    per_epoch = math.ceil(len(rows) / cfg.batch_size)
    epoch, pos = divmod(index, per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(rows), generator=g)[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
    return [rows[i] for i in order.tolist()]


def _schedule(cfg: TrainConfig, steps: int):
    warmup = int(round(cfg.warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


@torch.no_grad()
def dev_loss(model, rows: list[Row], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean LM loss (no load-balancing term) over the dev rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size], pad_id)
        out = model(**batch, loss_only=True)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())  # HF shifts labels by one
        total += float(out.lm_loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _save_checkpoint(out_dir: Path, model, opt, sched, state: dict[str, Any]) -> None:
    final = out_dir / CHECKPOINT_DIR
    tmp = out_dir / (CHECKPOINT_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_adapter(tmp / "adapter")
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                **state}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # a crash mid-save leaves the previous checkpoint intact


def _load_checkpoint(out_dir: Path, model, opt, sched, cfg: TrainConfig) -> dict[str, Any]:
    from milora.format.adapter import read_adapter

    ckpt = out_dir / CHECKPOINT_DIR
    if not (ckpt / "state.pt").is_file():
        raise TrainingError(f"cannot resume: no checkpoint at {ckpt}; run without --resume to start afresh")
    state = torch.load(ckpt / "state.pt", weights_only=True)
    if state["config"] != cfg.to_dict():
        diff = {k: (state["config"].get(k), v) for k, v in cfg.to_dict().items() if state["config"].get(k) != v}
        raise TrainingError(f"cannot resume: the training options differ from the checkpoint's "
                            f"(option: (checkpoint, now)) {diff}; resume with the same options")
    _, _, tensors = read_adapter(ckpt / "adapter")
    model.load_adapter_state_dict(tensors, where=str(ckpt / "adapter"))
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state


def train(model, tokenizer, train_data: list[Example], dev_data: list[Example], cfg: TrainConfig,
          out_dir: str | Path, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train `model` (a MiloraModel) in place and write the best adapter to out_dir.
    stop_after: stop (with a checkpoint) once that many optimizer steps are done in total, as
    an interruption would; a later call with resume=True continues the same run."""
    from milora.progress import progress as make_progress

    if not train_data:
        raise TrainingError("no training examples")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pad = pad_id_of(tokenizer)
    rows = [encode(tokenizer, e, cfg.max_length, cfg.chat) for e in train_data]
    dev_rows = [encode(tokenizer, e, cfg.max_length, cfg.chat) for e in dev_data]
    steps = total_steps(cfg, len(rows))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, steps))
    state: dict[str, Any] = {"config": cfg.to_dict(), "step": 0, "best": None, "best_step": None, "bad": 0,
                             "history": [], "stopped_early": False}
    if resume:
        state = _load_checkpoint(out_dir, model, opt, sched, cfg)
    else:
        torch.manual_seed(cfg.seed)
    train_losses: list[float] = []
    model.train()
    bar = make_progress(steps, "milora-train", "step", enabled=progress, initial=state["step"])
    end = steps if stop_after is None else min(steps, stop_after)
    while state["step"] < end and not state["stopped_early"]:
        step = state["step"]
        opt.zero_grad(set_to_none=True)
        loss_sum, lb_sum = 0.0, 0.0
        for a in range(cfg.grad_accum):
            batch = collate(micro_batch(rows, cfg, step * cfg.grad_accum + a), pad)
            # Loss only: the LM head over the response tokens, not the vocabulary at every prompt token.
            out = model(**batch, loss_only=True)
            (out.loss / cfg.grad_accum).backward()
            loss_sum += float(out.lm_loss.detach()) / cfg.grad_accum
            lb_sum += (float(out.lb_loss.detach()) if out.lb_loss is not None else 0.0) / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        state["step"] = step + 1
        train_losses.append(loss_sum)
        bar.update(1, loss=f"{loss_sum:.4f}", lb=f"{lb_sum:.4f}")
        if dev_rows and (state["step"] % cfg.eval_every == 0 or state["step"] == steps):
            _evaluate(model, dev_rows, pad, cfg, state, out_dir, bar)
        if state["step"] % cfg.eval_every == 0 or state["step"] == end:
            _save_checkpoint(out_dir, model, opt, sched, state)
    bar.close()
    if not dev_rows and state["step"] >= steps:
        model.save_adapter(out_dir)  # no dev set: the final adapter is the result
    result = TrainResult(state["step"], state["best"], state["best_step"], state["stopped_early"],
                         list(state["history"]), train_losses)
    (out_dir / LOG_FILE).write_text(json.dumps({"config": cfg.to_dict(), "total_steps": steps,
                                                "result": dataclasses.asdict(result)}, indent=2) + "\n")
    return result


def _evaluate(model, dev_rows, pad, cfg: TrainConfig, state: dict[str, Any], out_dir: Path, bar) -> None:
    loss = dev_loss(model, dev_rows, pad, cfg.dev_batch_size)
    state["history"].append({"step": state["step"], "dev_loss": loss})
    bar.write(f"step {state['step']}: dev loss {loss:.4f}")
    if state["best"] is None or loss < state["best"] - cfg.min_delta:
        state["best"], state["best_step"], state["bad"] = loss, state["step"], 0
        model.save_adapter(out_dir)
    else:
        state["bad"] += 1
        if state["bad"] >= cfg.patience:
            state["stopped_early"] = True
            bar.write(f"early stop: no dev improvement in {cfg.patience} evaluations "
                      f"(best {state['best']:.4f} at step {state['best_step']})")
