"""What the export layout costs the runtime on SmolLM2-135M: prefill latency (last-position
logits against logits for every position) and, for the weights shared between the two
graphs, the runtime's peak RSS after opening both sessions and the size of OUT_DIR.

    python benchmarks/export_layout_smollm2.py latency CONFIG [CONFIG ...] [--tokens 100] [--rounds 7]
    python benchmarks/export_layout_smollm2.py memory DIR [--share-weights]

latency: every CONFIG (an OUT_DIR, or OUT_DIR+shared to open it with share_weights=True)
is opened in this one process with the runtime's OrtBackend; B=1 and B=4 prompts of
--tokens tokens (base model, slot 0) are prefilled and decoded 2 steps, round by round with
the configs interleaved, and the median ms per prefill and per decode step is printed.
memory: opens DIR's two sessions with OrtBackend (the runtime's own session creation) in
this process, runs a B=4 prefill and 4 decode steps, and prints RSS (anonymous /
file-backed) after opening and after running, the peak, and the disk size of DIR; run it
once per configuration, in a fresh process. DIRs are exports written by milora-export (e.g.
with --no-validate) of the same base.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path


def backend(root: Path, threads: int | None, share_weights: bool = False):
    from milora.format import manifest as mf
    from milora.runtime.ort_backend import OrtBackend

    return OrtBackend(root, mf.read_manifest(root), threads=threads, share_weights=share_weights)


def rss_mb() -> dict:
    """Current RSS and its anonymous / file-backed parts (MB), from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 1024) for k in ("VmRSS", "RssAnon", "RssFile")}


def latency(configs: list[str], tokens: int, rounds: int, threads: int | None) -> dict:
    """Median ms of prefill and of a decode step, per config (DIR, or DIR+shared for
    share_weights=True), all open in this process and interleaved round by round."""
    import numpy as np

    backends = {c: backend(Path(c.removesuffix("+shared")), threads, c.endswith("+shared")) for c in configs}
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for b in (1, 4):
            prompts = [rng.integers(100, 40000, tokens).tolist() for _ in range(b)]
            for name, be in backends.items():
                start = time.perf_counter()
                logits, gates, kv = be.prefill(prompts, [0] * b)
                times.setdefault(f"{name} prefill B={b}", []).append((time.perf_counter() - start) * 1e3)
                for _ in range(2):
                    start = time.perf_counter()
                    logits = be.decode(logits.argmax(-1), kv, be.bind_rows(np.zeros(b, np.int64), gates))
                    times.setdefault(f"{name} decode B={b}", []).append((time.perf_counter() - start) * 1e3)
    return {k: round(statistics.median(v), 1) for k, v in sorted(times.items())}


def memory(root: Path, threads: int | None, share_weights: bool, tokens: int) -> dict:
    """RSS after opening both sessions, then after a B=4 prefill and 4 decode steps (every
    weight touched), and the peak."""
    import numpy as np

    start = time.perf_counter()
    be = backend(root, threads, share_weights)
    opened = time.perf_counter() - start
    after_open = rss_mb()
    prompts = np.random.default_rng(0).integers(100, 40000, (4, tokens)).tolist()
    logits, gates, kv = be.prefill(prompts, [0] * 4)
    for _ in range(4):
        logits = be.decode(logits.argmax(-1), kv, be.bind_rows(np.zeros(4, np.int64), gates))
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"dir": str(root), "share_weights": share_weights, "open_seconds": round(opened, 1),
            "after_open_mb": after_open, "after_run_mb": rss_mb(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "disk_mb": round(disk / 2**20)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["latency", "memory"])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--share-weights", action="store_true", help="memory: OrtBackend(share_weights=True)")
    args = p.parse_args()
    if args.mode == "latency":
        print(json.dumps(latency(args.dirs, args.tokens, args.rounds, args.threads), indent=2))
    else:
        print(json.dumps(memory(Path(args.dirs[0]), args.threads, args.share_weights, args.tokens)))


if __name__ == "__main__":
    main()
