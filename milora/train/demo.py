"""Demo tenants: small MiLoRA adapters for SmolLM2-135M-Instruct, each trained on a different
real task, once, on first use, then cached (never committed: they are reproducible).

    milora-assets demo-tenants          -> $MILORA_CACHE/demo-tenants/{arc-easy,boolq,gsm-symbolic}

Training is short (under a minute per tenant on a quiet 2-core CPU): long enough that each
tenant answers in its task's format, which the base model does not, not long enough to make
it good at the task; the demo prints each tenant's score beside the base model's and says
which. Each directory holds the adapter (fp16 LoRA, fp32 routers) and demo.json with the
recipe (task, options, seeds, threads) and the command that reproduces it; a cached tenant
whose recipe differs from the code's is trained again.

Reproducible: every seed is fixed and torch runs on DEMO_TORCH_THREADS intra-op threads
whatever the machine has (a parallel reduction's summation order depends on the thread
count, so two thread counts can give adapters that differ in the last bits). Same torch
build, same CPU kind: the same adapter bytes on every run.

Importing this module does not import torch (the demo's parent process reads the recipes).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milora.format.outdir import staged_directory

DEMO_DIRNAME = "demo-tenants"
_MARKER = ".milora-complete"
DEMO_INFO = "demo.json"


@dataclass(frozen=True)
class DemoTenant:
    task: str
    steps: int
    batch_size: int
    max_length: int
    top_k: int = 1
    lr: float = 2e-3
    grad_accum: int = 1  # micro-batches of batch_size per step: memory of one, examples of all

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum
    # First N training items (None: steps x examples per step, each seen once; encoding the
    # whole split would cost more than the steps on BoolQ).
    train_limit: int | None = None

    @property
    def items(self) -> int:
        return self.train_limit if self.train_limit is not None else self.steps * self.examples_per_step


# The fewest steps (docs/demo.md: about 80 s of training on a quiet 2-core CPU) after which
# each tenant's greedy answers visibly differ from the base model's: BoolQ needed 6 steps (4
# left its answers unchanged), gsm_symbolic 8 steps at a higher lr (6 at 2e-3 did not).
# max_length is above each task's longest item, so no row is truncated.
DEMO_TENANTS: dict[str, DemoTenant] = {
    "arc-easy": DemoTenant("arc_e", steps=6, batch_size=4, max_length=192, lr=3e-3),
    # BoolQ rows are the longest: two micro-batches of 2 keep its step under the export's peak memory.
    "boolq": DemoTenant("boolq", steps=6, batch_size=2, grad_accum=2, max_length=256, lr=2e-3),
    "gsm-symbolic": DemoTenant("gsm_symbolic", steps=8, batch_size=2, max_length=384, top_k=2, lr=3e-3),
}
DEMO_RANK = 8
DEMO_SEED = 0
# No dev pass: the run is too short for early stopping to choose anything, and the demo scores
# the tenants on test items through the runtime instead.
DEMO_DEV_LIMIT = 0
# torch intra-op threads while training: fixed so the adapters do not depend on the machine
# (see the module docstring); 2 because the demo targets 2-core machines.
DEMO_TORCH_THREADS = 2


def recipe(name: str) -> dict[str, Any]:
    """Everything a tenant's adapter depends on besides the base model and the code. A cached
    tenant is reused only when its demo.json holds this exact recipe."""
    spec = DEMO_TENANTS[name]
    adapter, train = demo_configs(spec)
    return {"task": spec.task, "adapter": adapter.to_json_dict({}), "train": train, "train_limit": spec.items,
            "dev_limit": DEMO_DEV_LIMIT, "torch_threads": DEMO_TORCH_THREADS, "save_dtype": "float16"}


def demo_configs(spec: DemoTenant):
    """(MiloraConfig, TrainConfig as a dict); the TrainConfig dict keeps this module torch-free."""
    from milora.format.config import MiloraConfig

    adapter = MiloraConfig(rank=DEMO_RANK, alpha=2.0 * DEMO_RANK, top_k=spec.top_k)
    # eval_every beyond the last step: no dev passes but the one at the end (recorded).
    train = dict(lr=spec.lr, max_steps=spec.steps, batch_size=spec.batch_size, grad_accum=spec.grad_accum,
                 eval_every=spec.steps + 1, warmup_ratio=0.1, seed=DEMO_SEED, max_length=spec.max_length)
    return adapter, train


def command(name: str) -> str:
    spec = DEMO_TENANTS[name]
    return (f"milora-assets demo-tenants --force  # or: OMP_NUM_THREADS={DEMO_TORCH_THREADS} milora-train "
            f"--base smollm2 --task {spec.task} --out DIR "
            f"--rank {DEMO_RANK} --alpha {2 * DEMO_RANK} --top-k {spec.top_k} --lr {spec.lr} --max-steps {spec.steps} "
            f"--batch-size {spec.batch_size} --grad-accum {spec.grad_accum} --max-length {spec.max_length} "
            f"--eval-every {spec.steps + 1} "
            f"--warmup-ratio 0.1 --seed {DEMO_SEED} --train-limit {spec.items} --dev-limit {DEMO_DEV_LIMIT} --fp16")


def tenants_root(cache: str | Path | None = None) -> Path:
    from milora.assets import cache_root

    return (Path(cache) if cache is not None else cache_root()) / DEMO_DIRNAME


def cached_tenant(root: Path, name: str) -> Path | None:
    """The tenant's directory if it is complete and was trained with today's recipe."""
    final = root / name
    if not (final / _MARKER).is_file():
        return None
    try:
        info = json.loads((final / DEMO_INFO).read_text())
    except (OSError, ValueError):
        return None
    return final if info.get("recipe") == json.loads(json.dumps(recipe(name))) else None


def train_tenant(name: str, root: Path, base: str | Path = "smollm2", progress: bool = True) -> Path:
    """Train one demo tenant into root/name (replacing what is there). Built in a temporary
    directory and renamed into place, so an interrupted run leaves no partial tenant."""
    import random

    import numpy as np
    import torch

    from milora.train.api import train_adapter
    from milora.train.loop import TrainConfig

    spec = DEMO_TENANTS[name]
    final = root / name
    threads = torch.get_num_threads()
    try:
        with staged_directory(final, "the demo tenant cache", f"train demo tenant {name}") as tmp:
            torch.set_num_threads(DEMO_TORCH_THREADS)
            random.seed(DEMO_SEED)
            np.random.seed(DEMO_SEED)
            adapter, train = demo_configs(spec)
            result = train_adapter(base, tmp, adapter, TrainConfig(**train), task=spec.task,
                                   train_limit=spec.items, dev_limit=DEMO_DEV_LIMIT, progress=progress,
                                   save_dtype=torch.float16)
            shutil.rmtree(tmp / "checkpoint", ignore_errors=True)  # optimizer state: not needed to serve
            (tmp / DEMO_INFO).write_text(json.dumps({
                "task": spec.task, "steps": result.steps, "final_train_loss": result.train_losses[-1],
                "dev_loss": result.best_dev_loss, "train_losses": result.train_losses,
                "adapter": adapter.to_json_dict({}), "train": TrainConfig(**train).to_dict(),
                "recipe": recipe(name), "command": command(name),
            }, indent=1) + "\n")
            (tmp / _MARKER).write_text("ok\n")
    finally:
        torch.set_num_threads(threads)
    return final


def demo_tenants(cache: str | Path | None = None, force: bool = False, base: str | Path = "smollm2",
                 names: list[str] | None = None, progress: bool = True) -> dict[str, Path]:
    """Directories of the demo adapters, training (in this process) each that is not cached
    with today's recipe."""
    root = tenants_root(cache)
    out: dict[str, Path] = {}
    for name in names or list(DEMO_TENANTS):
        cached = None if force else cached_tenant(root, name)
        out[name] = cached or train_tenant(name, root, base, progress)
    return out
