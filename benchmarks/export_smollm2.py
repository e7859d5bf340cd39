"""SmolLM2-135M with 3 tenants through milora-export: export wall time and peak RSS (the CLI
in a child process), validation errors, and the routed-LoRA lowering comparison (decode step
latency in onnxruntime on CPU, mixed-tenant and base-only batches).

    python benchmarks/export_smollm2.py [--work DIR] [--skip-lowerings] [--json out.json]

Tenants (random, non-zero B, seed-specific routers): "acme" rank 16 with the project
defaults (k=1); "globex" rank 8, k=2, last-token pooler, gelu pre_pool, renormalized;
"plain" rank 4 on q/v with no router (a plain LoRA, as a PEFT import would be).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TENANT_OPTIONS = {
    "acme": dict(rank=16, alpha=32),
    "globex": dict(rank=8, alpha=16, top_k=2, pooler="last", activation="gelu", activation_position="pre_pool",
                   gate_mode="renormalized"),
    "plain": dict(rank=4, alpha=8, routed=False, target_modules=("q_proj", "v_proj")),
}


def make_tenants(model_dir: Path, work: Path) -> dict[str, Path]:
    """Random adapters on the real base, saved in format v1 under work/adapters/."""
    import torch
    from transformers import AutoModelForCausalLM

    from milora.format.config import MiloraConfig
    from milora.model.model import MiloraModel

    out = {}
    for seed, (name, options) in enumerate(TENANT_OPTIONS.items()):
        model = MiloraModel(AutoModelForCausalLM.from_pretrained(model_dir), MiloraConfig(**options))
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for pname, p in model.adapter_parameters_by_name().items():
                if pname.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                elif pname.endswith("router.weight") or pname.endswith("router.pooler"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        out[name] = model.save_adapter(work / "adapters" / name)
    return out


def run_export(model_dir: Path, out: Path, adapters: dict[str, Path], *extra: str) -> dict:
    """The CLI in a child process: wall seconds, the child's peak RSS (MB) and its manifest."""
    cmd = [sys.executable, "-m", "milora.export.cli", str(model_dir), str(out), "--quiet", "--force", *extra]
    for name, d in adapters.items():
        cmd += ["--adapter", f"{name}={d}"]
    start = time.time()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    if status != 0:
        raise SystemExit(f"export failed ({status}): {' '.join(cmd)}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "manifest": manifest}


def decode_feeds(out: Path, batch: int, mix: bool, prompt: int = 16) -> tuple:
    """(decode session, feeds) after a prefill of `batch` rows: rows cycle over the tenants
    and the base model (mix) or all use slot 0."""
    from milora.format.pack import assemble_banks, default_slots
    from milora.format.manifest import read_manifest
    from milora.export.validate import Row, run_graphs, sessions

    m = read_manifest(out)
    names = [*m["tenants"], None] if mix else [None]
    rng = np.random.default_rng(0)
    rows = [Row(names[i % len(names)], rng.integers(10, 5000, prompt).tolist(), [11]) for i in range(batch)]
    sess = sessions(out, m)
    res = run_graphs(out, m, rows, sess)
    banks = assemble_banks(out, m, default_slots(m))
    slot_of = {n: i for i, n in enumerate(default_slots(m)) if n}
    feeds = {"input_ids": np.full((batch, 1), 11, np.int64), "attention_mask": res["final_mask"],
             "tenant_slots": np.array([slot_of.get(r.tenant, 0) for r in rows], np.int64),
             "gates": res["prefill"]["gates"]}
    for i in range(m["base"]["num_layers"]):
        feeds[f"past_key_values.{i}.key"] = res["prefill"][f"present.{i}.key"]
        feeds[f"past_key_values.{i}.value"] = res["prefill"][f"present.{i}.value"]
    wanted = {i["name"] for i in m["graphs"]["decode"]["inputs"]}
    feeds.update({n: banks[n] for n in banks if n in wanted})
    return sess["decode"], feeds


def compare_lowerings(outs: dict[str, Path], rounds: int = 15) -> dict[str, dict[str, float]]:
    """Median ms per decode step of each lowering. Runs are interleaved round by round so a
    change in machine load hits every lowering alike (the CPU here is shared)."""
    result: dict[str, dict[str, float]] = {low: {} for low in outs}
    for batch in (1, 4, 8):
        for mix in (True, False):
            label = f"B={batch} {'mixed' if mix else 'base'}"
            runs = {low: decode_feeds(out, batch, mix) for low, out in outs.items()}
            times: dict[str, list[float]] = {low: [] for low in outs}
            for r in range(rounds + 2):
                for low, (sess, feeds) in runs.items():
                    t = time.perf_counter()
                    sess.run(["logits"], feeds)
                    if r >= 2:  # warm-up rounds
                        times[low].append(time.perf_counter() - t)
            for low in outs:
                result[low][label] = round(1000 * float(np.median(times[low])), 1)
            print(label, {low: result[low][label] for low in outs}, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    from milora.assets import smollm2_dir

    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--skip-lowerings", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--reuse", action="store_true", help="reuse lowering exports already in --work")
    p.add_argument("--torch-threads", type=int, default=None, help="passed to milora-export")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="milora-bench-export-"))
    model_dir = smollm2_dir()
    adapters = make_tenants(model_dir, work)
    threads = ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
    main_run = run_export(model_dir, work / "out_compact", adapters, *threads)
    report = {"export": {k: v for k, v in main_run.items() if k != "manifest"},
              "validation": main_run["manifest"]["validation"], "lowerings": {}}
    print(json.dumps(report, indent=1), flush=True)
    if not args.skip_lowerings:
        outs = {"compact": work / "out_compact"}
        for low in ("dense", "if_skip", "if_compact"):
            outs[low] = work / f"out_{low}"
            if not (args.reuse and (outs[low] / "manifest.json").is_file()):
                run_export(model_dir, outs[low], adapters, "--no-validate", "--lora-lowering", low)
        report["lowerings"] = compare_lowerings(outs)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
