"""Decode throughput and time to first token of the milora runtime on SmolLM2-135M, side by
side in one process (numbers go to BENCHMARKS.md as ratios).

    python benchmarks/runtime_smollm2.py [--tokens 32] [--repeats 3] [--json out.json]

Configurations, each at B=1 (one tenant) and B=8 (8 different tenants in one batch):
  base        the base model exported without adapters (the floor)
  milora-k1   MiLoRA, k=1 of 7, rank R          (R = 16 and 32)
  milora-k2   MiLoRA, k=2 of 7, rank 16
  lora-7      plain LoRA on all 7 modules, unmerged (a non-routed tenant), rank R
  torch-eager the PyTorch reference (HF generate) with one MiLoRA k=1 r16 adapter; at B=8 the
              8 rows share that adapter (the reference holds one adapter per model)
Adapters are random (seeded, non-zero B, random routers): speed does not depend on training.
Exports are cached under $MILORA_CACHE/bench-runtime; --rebuild exports again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

PROMPT = ("Explain in a few sentences why the sky is blue, and what changes at sunset when the light "
          "travels through more of the atmosphere.")


def make_adapters(base_dir: Path, root: Path, rank: int, kinds: dict[str, dict], n: int = 8) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from milora.format.config import MiloraConfig
    from milora.model.model import MiloraModel

    out = {}
    for kind, options in kinds.items():
        for i in range(n):
            name = f"{kind}-r{rank}-{i}"
            path = root / "adapters" / name
            out[name] = path
            if (path / "milora_config.json").is_file():
                continue
            model = MiloraModel(AutoModelForCausalLM.from_pretrained(base_dir),
                                MiloraConfig(rank=rank, alpha=2.0 * rank, **options))
            g = torch.Generator().manual_seed(1000 * rank + 100 * len(out) + i)
            with torch.no_grad():
                for pname, p in model.adapter_parameters_by_name().items():
                    if pname.endswith("lora_B"):
                        p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
                    elif pname.endswith("router.weight"):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            model.save_adapter(path)
    return out


def export_once(base_dir: Path, out_dir: Path, adapters: dict[str, Path], rebuild: bool) -> Path:
    from milora.export.exporter import export

    if rebuild or not (out_dir / "manifest.json").is_file():
        shutil.rmtree(out_dir, ignore_errors=True)
        t0 = time.perf_counter()
        export(base_dir, out_dir, adapters={k: str(v) for k, v in adapters.items()}, validate=False, force=True)
        print(f"exported {out_dir.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out_dir


def runtime_once(engine, tenants: list[str | None], tokens: int) -> tuple[float, float]:
    """(decode tok/s after the first step, time to first token) of one batch."""
    from milora.runtime import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    reqs = [engine.submit(t, messages=[{"role": "user", "content": PROMPT}], params=params) for t in tenants]
    engine.step()  # prefill + first decode step
    t_first = time.perf_counter()
    engine.run_until_done()
    seconds = time.perf_counter() - t_first
    decoded = sum(len(r.output_ids) for r in reqs) - 2 * len(reqs)  # tokens after the first step
    return decoded / seconds, max(r.first_token_at - r.submitted_at for r in reqs)


def torch_once(model, ids, tokens: int) -> tuple[float, float]:
    """Eager HF generate with the reference; a streamer timestamps every generated step, so the
    decode rate excludes prefill exactly as the runtime's does."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # first call: the prompt; then one call per generated step
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, streamer=clock)
    steps = clock.times[1:]  # steps[0]: first token out (prefill done)
    return ids.shape[0] * (len(steps) - 2) / (steps[-1] - steps[1]), steps[0] - t0


def torch_reference(base_dir: Path, adapter: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from milora.model.model import MiloraModel

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = MiloraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return model, lambda batch: tok([text] * batch, return_tensors="pt").input_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads for the eager baseline (default: torch's own)")
    args = p.parse_args()

    from milora.assets import cache_root, smollm2_dir
    from milora.runtime import Engine

    base_dir = smollm2_dir()
    root = cache_root() / "bench-runtime"
    r16 = make_adapters(base_dir, root, 16, {"milora-k1": {"top_k": 1}, "milora-k2": {"top_k": 2},
                                              "lora-7": {"routed": False}})
    r32 = make_adapters(base_dir, root, 32, {"milora-k1": {"top_k": 1}, "lora-7": {"routed": False}})
    paths = {"base": export_once(base_dir, root / "out-base", {}, args.rebuild),
             "r16": export_once(base_dir, root / "out-r16", r16, args.rebuild),
             "r32": export_once(base_dir, root / "out-r32", r32, args.rebuild)}
    engines = {k: Engine(v, max_batch=8, verify=False) for k, v in paths.items()}
    groups = [("base", "base", [None] * 8)] + [
        (f"{kind} r{r}", f"r{r}", [f"{kind}-r{r}-{i}" for i in range(8)])
        for kind, r in (("milora-k1", 16), ("milora-k2", 16), ("lora-7", 16), ("milora-k1", 32), ("lora-7", 32))]
    for _, exp, tenants in groups:
        for t in tenants:
            if t:
                engines[exp].pin(t)  # adapters resident before timing
    configs = {f"{label} B={b}": (lambda e=engines[exp], ts=tenants[:b]: runtime_once(e, ts, args.tokens))
               for label, exp, tenants in groups for b in (1, 8)}
    if not args.skip_torch:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        model, make_ids = torch_reference(base_dir, r16["milora-k1-r16-0"])
        for b in (1, 8):
            configs[f"torch-eager B={b}"] = lambda ids=make_ids(b): torch_once(model, ids, args.tokens)
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
    for rnd in range(args.repeats + 1):  # interleaved: load drift hits every configuration alike
        for key, run in configs.items():
            result = run()
            if rnd:
                samples[key].append(result)
                print(f"round {rnd} {key}: {result[0]:.1f} tok/s", file=sys.stderr)
    results = {k: {"tok_s": statistics.median(s[0] for s in v), "ttft_s": statistics.median(s[1] for s in v)}
               for k, v in samples.items()}
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(results: dict[str, dict]) -> str:
    lines = ["| configuration | B | decode tok/s | vs base | vs torch eager | time to first token |", "|---|---|---|---|---|---|"]
    for key, r in results.items():
        label, b = key.rsplit(" B=", 1)
        base = results.get(f"base B={b}", {}).get("tok_s")
        torch_ = results.get(f"torch-eager B={b}", {}).get("tok_s")
        vs_base = f"{r['tok_s'] / base:.2f}x" if base else "-"
        vs_torch = f"{r['tok_s'] / torch_:.2f}x" if torch_ else "-"
        lines.append(f"| {label} | {b} | {r['tok_s']:.1f} | {vs_base} | {vs_torch} | {1000 * r['ttft_s']:.0f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
