"""GPU check of the routed LoRA kernel (milora/plugins): correctness against the PyTorch
reference, then microbenchmarks, in under 5 minutes on a CUDA machine with torch and triton
(no TensorRT, no onnxruntime-gpu needed). Writes JSON.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget-s 280]
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --tiny --out x.json     # CPU: tests run this

1. Correctness: random shapes (decode and prefill tactics, float32 / float16 / bfloat16, ranks
   that are not powers of two, sizes that are not multiples of the blocks, in place and not)
   and edge cases (no active row, all rows active, one row, a NaN in one tenant's bank, a NaN
   gate, slot-0 rows bit for bit), each against milora.plugins.torch_ops.plugin_contract
   (float64), which equals milora.export.routed_lora.routed_lora_reference on healthy inputs.
2. Microbenchmarks, per decoder layer of 7 modules (hidden x hidden each),
   B rows of T = 1 token, each row its own tenant, k of 7 modules routed on per row:
     routed   the routed kernel, in place, once per module (what the TensorRT plugin runs)
     dense    the dense 7-module LoRA: gather A and B of every row, bmm, bmm (the "dense"
              onnxruntime lowering)
     base     the base GEMMs alone (x @ W for the 7 modules): the floor the LoRA adds to
   Timed with CUDA graphs (launch overhead as in a TensorRT engine run with CUDA graphs) and
   eagerly; medians of several rounds. Bandwidth: the bytes the routed kernel must move
   (launch.moved_bytes: A and B of the active (row, module) pairs, their x, base_out and y)
   over its time, as a fraction of the device's bandwidth (memory clock x bus width) and of a
   measured device-to-device copy.
   Targets (k=1, B=32, hidden 4096, rank 16, fp16): routed >= 2x faster than dense, and >= 70%
   of the bandwidth its bytes allow. The JSON records each target, the value and whether it was
   met; also the time of a launch with no active row (the fixed cost every launch pays).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_SPEEDUP, TARGET_BANDWIDTH = 2.0, 0.70
TOL = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}  # tf32 is off (input_precision="ieee")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=280.0, help="stop starting new sections after this")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1: the tests)")
    p.add_argument("--cases", type=int, default=40, help="random correctness cases")
    return p.parse_args(argv)


def device_info(torch, device: str) -> dict:
    import triton

    info = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
        clock, width = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        info["peak_bandwidth_Bps"] = 2 * clock * 1000 * width // 8 if clock and width else None
    return info


def make_case(torch, device, seed, B, T, d_in, d_out, R, S, L, dtype, active=0.6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d_in, generator=g)
    base = torch.randn(B, T, d_out, generator=g)
    a = torch.randn(S, L, d_in, R, generator=g) / d_in ** 0.5
    b = torch.randn(S, L, R, d_out, generator=g) * 0.5
    a[0], b[0] = 0, 0
    slots = torch.randint(0, S, (B,), generator=g)
    gates = torch.rand(B, 7, generator=g) + 0.1
    gates[torch.rand(B, generator=g) > active] = 0
    dt = getattr(torch, dtype)
    return [t.to(device=device, dtype=dt if t.is_floating_point() and i < 4 else t.dtype)
            for i, t in enumerate((x, base, a, b, slots, gates))]


def bits(torch, t):
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def correctness(torch, ops, launch, device: str, tiny: bool, n_cases: int) -> list[dict]:
    """Each case: {"name", "ok", "max_err" or "error"}."""
    import random

    results = []

    def record(name, fn):
        try:
            err = fn()
            results.append({"name": name, "ok": True, "max_err": err})
        except Exception as exc:  # noqa: BLE001 - a failing case is reported, the others still run
            results.append({"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                            "trace": traceback.format_exc()[-2000:]})

    def close(y, args, layer, expert, dtype, rows=None):
        want = ops.plugin_contract(*args, layer, expert)
        y, want = (y, want) if rows is None else (y[rows], want[rows])
        torch.testing.assert_close(y.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype], equal_nan=True)
        finite = torch.isfinite(want)
        return float((y.float() - want.float())[finite].abs().max()) if finite.any() else 0.0

    rng = random.Random(0)
    size = (lambda lo, hi: rng.randint(lo, hi)) if tiny else (lambda lo, hi: rng.randint(lo * 8, hi * 24))
    for i in range(n_cases):
        dtype = rng.choice(list(TOL))
        shape = dict(B=rng.randint(1, 6 if tiny else 40), T=rng.choice([1, 1, 3, 17] if tiny else [1, 1, 7, 64, 300]),
                     d_in=size(5, 80), d_out=size(5, 80), R=rng.choice([1, 5, 16, 17, 24]), S=rng.randint(2, 5),
                     L=rng.randint(1, 3))
        layer, expert, tactic = rng.randrange(shape["L"]), rng.randrange(7), rng.choice([None, *launch.TACTICS])
        in_place = rng.random() < 0.5

        def run(seed=i, shape=shape, dtype=dtype, layer=layer, expert=expert, tactic=tactic, in_place=in_place):
            args = make_case(torch, device, seed, **shape, dtype=dtype, active=rng.random())
            if in_place:
                y = ops.routed_lora_(args[0], args[1].clone(), *args[2:], layer, expert, tactic=tactic)
            else:
                y = ops.routed_lora(*args, layer, expert, tactic=tactic)
            return close(y, args, layer, expert, dtype)

        record(f"random_{i}_{dtype}_B{shape['B']}_T{shape['T']}_{shape['d_in']}x{shape['d_out']}_r{shape['R']}"
               f"_t{tactic}{'_inplace' if in_place else ''}", run)

    d = 24 if tiny else 4096

    def edge(name, fn):
        for dtype in TOL:
            record(f"{name}_{dtype}", lambda dtype=dtype: fn(dtype))

    def no_active_row(dtype):
        x, base, a, b, slots, gates = make_case(torch, device, 1, 4, 3, d, d, 16, 3, 2, dtype)
        gates[:, 2] = 0
        x[:] = float("nan")
        y = ops.routed_lora(x, base, a, b, slots, gates, 0, 2)
        assert torch.equal(bits(torch, y), bits(torch, base))
        return 0.0

    def all_rows(dtype):
        args = make_case(torch, device, 2, 5, 2, d, d, 16, 3, 2, dtype, active=1.0)
        args[4][:] = torch.tensor([1, 2, 1, 2, 2])
        return close(ops.routed_lora(*args, 1, 6), args, 1, 6, dtype)

    def one_row(dtype):
        args = make_case(torch, device, 3, 1, 1, d, d, 16, 3, 2, dtype, active=1.0)
        args[4][:] = 1
        return close(ops.routed_lora(*args, 0, 0), args, 0, 0, dtype)

    def nan_bank(dtype):
        args = make_case(torch, device, 4, 6, 3, d, d, 16, 3, 2, dtype, active=1.0)
        args[4][:] = torch.tensor([2, 1, 2, 0, 1, 2])
        args[5][5, 3] = 0
        args[2][2, 1, 5, 1] = float("nan")
        y = ops.routed_lora(*args, 1, 3)
        assert torch.isnan(y[0]).any() and torch.isnan(y[2]).any() and torch.isfinite(y[[1, 3, 4, 5]]).all()
        assert torch.equal(bits(torch, y[[3, 5]]), bits(torch, args[1][[3, 5]]))
        return close(y, args, 1, 3, dtype, rows=[1, 3, 4, 5])

    def nan_gate(dtype):
        args = make_case(torch, device, 5, 4, 2, d, d, 16, 3, 2, dtype, active=1.0)
        args[4][:] = torch.tensor([1, 2, 0, 1])
        args[5][0, 5] = args[5][2, 5] = float("nan")
        y = ops.routed_lora(*args, 0, 5)
        assert torch.isnan(y[0]).all() and torch.equal(bits(torch, y[2]), bits(torch, args[1][2]))
        return close(y, args, 0, 5, dtype, rows=[1, 3])

    def slot_zero(dtype):
        args = make_case(torch, device, 6, 5, 3, d, d, 16, 3, 2, dtype, active=1.0)
        args[4][:] = torch.tensor([0, 1, 0, 2, 0])
        for tactic in (2, 5):
            y = ops.routed_lora(*args, 1, 1, tactic=tactic)
            assert torch.equal(bits(torch, y[[0, 2, 4]]), bits(torch, args[1][[0, 2, 4]]))
        return 0.0

    for name, fn in (("no_active_row", no_active_row), ("all_rows_active", all_rows), ("one_row_one_token", one_row),
                     ("nan_in_one_tenants_bank", nan_bank), ("nan_gate_stays_in_its_row", nan_gate),
                     ("slot_zero_bit_for_bit", slot_zero)):
        edge(name, fn)
    return results


class Timer:
    """Median seconds per call of fn: CUDA events (optionally over a CUDA graph of `inner`
    calls) on a GPU, perf_counter on a CPU."""

    def __init__(self, torch, device: str, rounds: int, inner: int):
        self.torch, self.device, self.rounds, self.inner = torch, device, rounds, inner

    def __call__(self, fn, graph: bool) -> float:
        torch = self.torch
        for _ in range(2):
            fn()  # compile and warm up
        if self.device != "cuda":
            times = []
            for _ in range(self.rounds):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        torch.cuda.synchronize()
        if graph:
            g = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
                with torch.cuda.graph(g, stream=stream):
                    for _ in range(self.inner):
                        fn()
            torch.cuda.current_stream().wait_stream(stream)
            call = g.replay
        else:
            def call():
                for _ in range(self.inner):
                    fn()
        times = []
        for _ in range(self.rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / self.inner)
        return statistics.median(times)


def bench_layer(torch, ops, launch, device, timer, B, hidden, rank, k, dtype, tactics, graph: bool) -> dict:
    """One decoder layer of 7 hidden x hidden modules, B rows of one token, each row its own
    tenant with k modules routed on."""
    dt = getattr(torch, dtype)
    S, E, gen = B + 1, 7, torch.Generator().manual_seed(0)
    slots = torch.arange(1, B + 1, device=device)
    gates = torch.zeros(B, E)
    for row in range(B):
        gates[row, torch.randperm(E, generator=gen)[:k]] = torch.rand(k, generator=gen) + 0.5
    gates = gates.to(device)
    mods = []
    for m in range(E):
        a = (torch.randn(S, 1, hidden, rank, generator=gen) / hidden ** 0.5).to(device=device, dtype=dt)
        b = (torch.randn(S, 1, rank, hidden, generator=gen) * 0.1).to(device=device, dtype=dt)
        w = (torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5).to(device=device, dtype=dt)
        mods.append((a, b, w))
    x = torch.randn(B, 1, hidden, generator=gen).to(device=device, dtype=dt)
    outs = [torch.randn(B, 1, hidden, generator=gen).to(device=device, dtype=dt) for _ in range(E)]

    def routed(tactic):
        def fn():
            for m, (a, b, _) in enumerate(mods):
                ops.routed_lora_(x, outs[m], a, b, slots, gates, 0, m, tactic=tactic)
        return fn

    def dense():
        for m, (a, b, _) in enumerate(mods):
            ag, bg = a[slots, 0], b[slots, 0]  # gather: [B, hidden, R], [B, R, hidden]
            g = gates[:, m].to(dt)[:, None, None]
            outs[m].baddbmm_(torch.bmm(x, ag) * g, bg)

    def base():
        for m, (_, _, w) in enumerate(mods):
            torch.matmul(x[:, 0], w, out=outs[m][:, 0])

    elem = torch.tensor([], dtype=dt).element_size()
    moved = 0
    for m in range(E):
        p = launch.problem([tuple(x.shape), tuple(outs[m].shape), tuple(mods[m][0].shape), tuple(mods[m][1].shape),
                            (B,), (B, E)], 0, m)
        moved += launch.moved_bytes(p, int((gates[:, m] != 0).sum()), elem)
    per_tactic = {t: timer(routed(t), graph) for t in tactics}
    best = min(per_tactic, key=per_tactic.get)
    saved = gates.clone()
    gates.zero_()
    empty = timer(routed(best), graph)  # 7 launches with no active row: the fixed cost
    gates.copy_(saved)
    return {"B": B, "hidden": hidden, "rank": rank, "k": k, "dtype": dtype, "graph": graph,
            "routed_s": per_tactic[best], "routed_by_tactic_s": {str(t): v for t, v in per_tactic.items()},
            "best_tactic": best, "routed_no_active_row_s": empty, "dense_s": timer(dense, graph),
            "base_s": timer(base, graph), "routed_bytes": moved}


def copy_bandwidth(torch, device) -> float | None:
    if device != "cuda":
        return None
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = Timer(torch, device, rounds=5, inner=4)
    return 2 * src.numel() / timer(lambda: dst.copy_(src), graph=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    import torch

    from milora.plugins import launch, torch_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not torch_ops.interpreted():
        print("no CUDA device: run with TRITON_INTERPRET=1 and --tiny to check the script on a CPU", file=sys.stderr)
        return 2
    report = {"info": device_info(torch, device), "tiny": args.tiny, "sections": {}}
    cases = correctness(torch, torch_ops, launch, device, args.tiny, 6 if args.tiny else args.cases)
    report["correctness"] = {"cases": cases, "passed": sum(c["ok"] for c in cases), "failed": sum(not c["ok"] for c in cases)}
    report["sections"]["correctness_s"] = round(time.time() - started, 1)

    timer = Timer(torch, device, rounds=3 if args.tiny else 7, inner=1 if args.tiny else 20)
    configs = [dict(B=4, hidden=64, rank=5, k=1, dtype="float32")] if args.tiny else \
        [dict(B=32, hidden=4096, rank=16, k=1, dtype="float16"), dict(B=32, hidden=4096, rank=16, k=1, dtype="bfloat16"),
         dict(B=8, hidden=4096, rank=16, k=1, dtype="float16"), dict(B=32, hidden=4096, rank=16, k=2, dtype="float16"),
         dict(B=32, hidden=4096, rank=64, k=7, dtype="float16")]
    report["bandwidth"] = {"peak_Bps": report["info"].get("peak_bandwidth_Bps"), "copy_Bps": copy_bandwidth(torch, device)}
    report["layers"] = []
    for cfg in configs:
        for graph in ((False,) if device != "cuda" else (True, False)):
            if time.time() - started > args.budget_s:
                report["layers"].append(dict(cfg, skipped="time budget"))
                continue
            row = bench_layer(torch, torch_ops, launch, device, timer, **cfg, graph=graph,
                              tactics=launch.DECODE_TACTICS[:1] if args.tiny else launch.DECODE_TACTICS)
            row["speedup_vs_dense"] = row["dense_s"] / row["routed_s"]
            row["routed_over_base"] = row["routed_s"] / row["base_s"]
            achieved = row["routed_bytes"] / row["routed_s"]
            row["achieved_Bps"] = achieved
            for key in ("peak_Bps", "copy_Bps"):
                ref = report["bandwidth"][key]
                row[f"bandwidth_fraction_of_{key[:-4]}"] = achieved / ref if ref else None
            report["layers"].append(row)
    spec = next((r for r in report["layers"] if r.get("graph") and r.get("B") == 32 and r.get("rank") == 16
                 and r.get("k") == 1 and r.get("dtype") == "float16"), None)
    report["targets"] = {
        "speedup_vs_dense": {"target": TARGET_SPEEDUP, "value": spec and spec["speedup_vs_dense"],
                             "met": bool(spec and spec["speedup_vs_dense"] >= TARGET_SPEEDUP)},
        "bandwidth_fraction": {"target": TARGET_BANDWIDTH, "value": spec and spec["bandwidth_fraction_of_peak"],
                               "met": bool(spec and (spec["bandwidth_fraction_of_peak"] or 0) >= TARGET_BANDWIDTH)},
        "shape": "k=1, B=32, hidden 4096, rank 16, float16, CUDA graphs" if not args.tiny else "not measured (--tiny)"}
    report["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({"correctness": {k: report["correctness"][k] for k in ("passed", "failed")},
                      "targets": report["targets"], "seconds": report["seconds"], "out": str(args.out)}))
    return 0 if report["correctness"]["failed"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
