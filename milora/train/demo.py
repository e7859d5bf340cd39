"""Demo tenants: small MiLoRA adapters for SmolLM2-135M-Instruct, each trained on a different
real task, once, on first use, then cached (never committed: they are reproducible).

    milora-assets demo-tenants          -> $MILORA_CACHE/demo-tenants/{arc-easy,boolq,gsm-symbolic}

Training is deliberately short (a few minutes per tenant on a 2-core CPU): these adapters
exist to give the exporter and the runtime real, distinct, routed tenants to serve, not to
be good at their tasks. Each directory holds the adapter (fp16 LoRA, fp32 routers) and
demo.json with the task, the options and the command that reproduces it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from milora.format.config import MiloraConfig
from milora.train.loop import TrainConfig

DEMO_DIRNAME = "demo-tenants"
_MARKER = ".milora-complete"


@dataclass(frozen=True)
class DemoTenant:
    task: str
    steps: int
    batch_size: int
    max_length: int
    top_k: int = 1


DEMO_TENANTS: dict[str, DemoTenant] = {
    "arc-easy": DemoTenant("arc_e", steps=8, batch_size=4, max_length=192),
    "boolq": DemoTenant("boolq", steps=6, batch_size=4, max_length=256),
    "gsm-symbolic": DemoTenant("gsm_symbolic", steps=6, batch_size=2, max_length=384, top_k=2),
}
DEMO_RANK = 8
DEMO_LR = 2e-3
DEMO_SEED = 0


def demo_configs(spec: DemoTenant) -> tuple[MiloraConfig, TrainConfig]:
    adapter = MiloraConfig(rank=DEMO_RANK, alpha=2.0 * DEMO_RANK, top_k=spec.top_k)
    # eval_every beyond the last step: no dev passes, the final adapter is the result.
    train = TrainConfig(lr=DEMO_LR, max_steps=spec.steps, batch_size=spec.batch_size, eval_every=spec.steps + 1,
                        warmup_ratio=0.1, seed=DEMO_SEED, max_length=spec.max_length)
    return adapter, train


def demo_tenants(cache: str | Path | None = None, force: bool = False, base: str | Path = "smollm2",
                 names: list[str] | None = None, progress: bool = True) -> dict[str, Path]:
    """Directories of the demo adapters, training each that is not cached yet. Each is built in
    a temporary directory and renamed into place, so an interrupted run leaves no partial tenant."""
    import torch

    from milora.assets import cache_root
    from milora.train.api import train_adapter

    root = (Path(cache) if cache is not None else cache_root()) / DEMO_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name in names or list(DEMO_TENANTS):
        spec = DEMO_TENANTS[name]
        final = root / name
        if (final / _MARKER).is_file() and not force:
            out[name] = final
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            adapter, train = demo_configs(spec)
            # A small dev slice: one dev loss at the end, recorded in demo.json.
            result = train_adapter(base, tmp, adapter, train, task=spec.task, dev_limit=8, progress=progress,
                                   save_dtype=torch.float16)
            shutil.rmtree(tmp / "checkpoint", ignore_errors=True)  # optimizer state: not needed to serve
            (tmp / "demo.json").write_text(json.dumps({
                "task": spec.task, "steps": result.steps, "final_train_loss": result.train_losses[-1],
                "dev_loss": result.best_dev_loss,
                "adapter": adapter.to_json_dict({}), "train": train.to_dict(),
                "command": f"milora-assets demo-tenants --force  # or: milora-train --base smollm2 --task {spec.task} "
                           f"--out DIR --rank {DEMO_RANK} --alpha {2 * DEMO_RANK} --top-k {spec.top_k} "
                           f"--lr {DEMO_LR} --max-steps {spec.steps} --batch-size {spec.batch_size} "
                           f"--max-length {spec.max_length} --eval-every {spec.steps + 1} --warmup-ratio 0.1 --fp16",
            }, indent=1) + "\n")
            (tmp / _MARKER).write_text("ok\n")
            tmp.chmod(0o755)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out[name] = final
    return out
