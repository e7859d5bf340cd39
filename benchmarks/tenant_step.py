"""Decode step time of the base export against a tenants' export, in one process.

Fresh-process comparisons (benchmarks/peers.py) carry each process's own luck (where its memory
landed); this opens both exports side by side in one process and interleaves them, so the
ratio is the graphs' and the runtime's alone:

    python benchmarks/tenant_step.py [--work-dir DIR] [--rounds 5] [--new-tokens 48]

It reads the exports benchmarks/peers.py made under its work dir (out-base, out-r16: run peers.py
once first) and runs, B=8, the same 8 real prompts as peers.py: the base export; the tenants'
export with untenanted rows (its graph, no LoRA rows); the tenants' export with 8 MiLoRA k=1
r16 tenants. Prints the median ms per decode step (tokens 8 to the end of row 0's output).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import peers  # noqa: E402
from milora.assets import cache_root, smollm2_dir  # noqa: E402
from milora.runtime import Engine, SamplingParams  # noqa: E402

SKIP = 8  # steps left out at the start of each generation


def step_ms(engine: Engine, tenants: list, prompts: list, new: int) -> float:
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    reqs = [engine.submit(t, prompt_ids=p, params=params) for t, p in zip(tenants, prompts)]
    engine.run_until_done()
    times = reqs[0].token_times
    return (times[-1] - times[SKIP]) / (len(times) - SKIP - 1) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=cache_root() / "bench-peers",
                   help="peers.py's work dir (default $MILORA_CACHE/bench-peers)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args()
    missing = [d for d in ("out-base", "out-r16") if not (args.work_dir / d / "manifest.json").exists()]
    if missing:
        sys.exit(f"{args.work_dir} has no {', '.join(missing)}: run benchmarks/peers.py once first (or pass --work-dir)")
    prompts = peers.make_prompts(smollm2_dir())[:8]
    base = Engine(args.work_dir / "out-base", max_batch=8, threads=peers.THREADS, verify=False)
    tenants = Engine(args.work_dir / "out-r16", max_batch=8, threads=peers.THREADS, verify=False)
    names = [f"milora-k1-r16-{i}" for i in range(8)]
    for name in names:
        tenants.pin(name)
    cases = {"base export": (base, [None] * 8), "tenants' export, untenanted rows": (tenants, [None] * 8),
             "tenants' export, 8 k=1 r16 tenants": (tenants, names)}
    times = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, (engine, rows) in cases.items():
            times[k].append(step_ms(engine, rows, prompts, args.new_tokens))
    first = statistics.median(times["base export"])
    print(f"B=8, {args.new_tokens} new tokens, {peers.THREADS} threads, {args.rounds} rounds, load {os.getloadavg()[0]:.1f}")
    print("| | ms per step (median) | base / this | rounds |\n|---|---|---|---|")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"| {k} | {m:.2f} | {first / m:.2f}x | {', '.join(f'{x:.1f}' for x in v)} |")


if __name__ == "__main__":
    main()
