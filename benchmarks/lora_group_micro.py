"""What one routed-LoRA group costs onnxruntime per decode step, in isolation.

The fused decode graph applies each layer's LoRA groups (qkv, o, gate_up, down) to the rows that
use them as four nodes: GatherND(x, rows) -> MatMul(A [n, in, r]) -> MatMul(B [n, r, out]) ->
ScatterND(base output, rows, reduction=add). SmolLM2 has 120 such groups. This builds a chain of
120 576x576 MatMuls (a stand-in for the base projections) with one group after each, in the
lowering's form and in the alternatives considered, and times them against the bare chain:

    python benchmarks/lora_group_micro.py [--threads 2] [--rounds 7]

Forms (B = 8 rows in the batch, n of them routed to the group, rank 16):
  gather-scatter   the lowering today (n rows)
  dense            every row, no gather/scatter: MatMul(x, A [B, in, r]), MatMul(B [B, r, out]), Add
  block-diagonal   2-D MatMuls: x_rows @ [A_1 .. A_n] (n x n*r), times a block mask, @ [B_1; ..; B_n]
  gather-only      GatherND + ScatterND without the MatMuls (what the row selection costs)
  moe              onnxruntime's MoE contrib op over the adapter bank (9 slots as experts, each
                   row's slot chosen by a one-hot router, identity activation) + Add: one node
                   per group, but MoE needs out == in (here 576 -> 576; SmolLM2's qkv, gate_up
                   and down groups are not), so it could serve the o group only
One process, forms interleaved round by round, medians; prints the per-group cost in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BATCH, DIM, RANK, GROUPS = 8, 576, 16, 120
SLOTS = 9  # the adapter bank's slots (8 tenants + the base's zero slot) as MoE experts


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def build(form: str, n: int, rng) -> tuple[onnx.ModelProto, dict]:
    nodes, inits = [], []
    inputs = [_vi("x", TensorProto.FLOAT, [BATCH, 1, DIM])]
    feeds = {"x": rng.standard_normal((BATCH, 1, DIM)).astype(np.float32)}
    small = lambda *shape: (rng.standard_normal(shape) * 0.01).astype(np.float32)
    cur = "x"
    for i in range(GROUPS):
        inits.append(numpy_helper.from_array((rng.standard_normal((DIM, DIM)) * 0.03).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"y{i}"]))
        cur = f"y{i}"
        if form == "none":
            continue
        rows = np.sort(rng.choice(BATCH, n, replace=False)).reshape(n, 1).astype(np.int64)
        if form in ("gather-scatter", "gather-only", "block-diagonal"):
            inputs.append(_vi(f"r{i}", TensorProto.INT64, [n, 1]))
            feeds[f"r{i}"] = rows
            nodes.append(helper.make_node("GatherND", [cur, f"r{i}"], [f"g{i}"]))
        if form == "gather-scatter":
            inputs += [_vi(f"A{i}", TensorProto.FLOAT, [n, DIM, RANK]), _vi(f"B{i}", TensorProto.FLOAT, [n, RANK, DIM])]
            feeds.update({f"A{i}": small(n, DIM, RANK), f"B{i}": small(n, RANK, DIM)})
            nodes += [helper.make_node("MatMul", [f"g{i}", f"A{i}"], [f"a{i}"]),
                      helper.make_node("MatMul", [f"a{i}", f"B{i}"], [f"b{i}"])]
        elif form == "block-diagonal":
            inputs += [_vi(f"A{i}", TensorProto.FLOAT, [DIM, n * RANK]), _vi(f"B{i}", TensorProto.FLOAT, [n * RANK, DIM]),
                       _vi(f"m{i}", TensorProto.FLOAT, [n, 1, n * RANK])]
            feeds.update({f"A{i}": small(DIM, n * RANK), f"B{i}": small(n * RANK, DIM),
                          f"m{i}": np.kron(np.eye(n), np.ones(RANK)).reshape(n, 1, n * RANK).astype(np.float32)})
            nodes += [helper.make_node("MatMul", [f"g{i}", f"A{i}"], [f"a{i}"]),
                      helper.make_node("Mul", [f"a{i}", f"m{i}"], [f"am{i}"]),
                      helper.make_node("MatMul", [f"am{i}", f"B{i}"], [f"b{i}"])]
        elif form == "gather-only":
            nodes.append(helper.make_node("Identity", [f"g{i}"], [f"b{i}"]))
        if form == "moe":
            inputs += [_vi(f"p{i}", TensorProto.FLOAT, [BATCH, SLOTS]), _vi(f"A{i}", TensorProto.FLOAT, [SLOTS, RANK, DIM]),
                       _vi(f"B{i}", TensorProto.FLOAT, [SLOTS, DIM, RANK])]
            router = np.full((BATCH, SLOTS), -30.0, np.float32)
            router[np.arange(BATCH), rng.integers(0, SLOTS, BATCH)] = 0.0
            feeds.update({f"p{i}": router, f"A{i}": small(SLOTS, RANK, DIM), f"B{i}": small(SLOTS, DIM, RANK)})
            nodes += [helper.make_node("MoE", [cur, f"p{i}", f"A{i}", "", f"B{i}"], [f"b{i}"], domain="com.microsoft",
                                       activation_type="identity", k=1, normalize_routing_weights=0),
                      helper.make_node("Add", [cur, f"b{i}"], [f"z{i}"])]
        elif form == "dense":
            inputs += [_vi(f"A{i}", TensorProto.FLOAT, [BATCH, DIM, RANK]), _vi(f"B{i}", TensorProto.FLOAT, [BATCH, RANK, DIM])]
            feeds.update({f"A{i}": small(BATCH, DIM, RANK), f"B{i}": small(BATCH, RANK, DIM)})
            nodes += [helper.make_node("MatMul", [cur, f"A{i}"], [f"a{i}"]),
                      helper.make_node("MatMul", [f"a{i}", f"B{i}"], [f"b{i}"]),
                      helper.make_node("Add", [cur, f"b{i}"], [f"z{i}"])]
        else:
            nodes.append(helper.make_node("ScatterND", [cur, f"r{i}", f"b{i}"], [f"z{i}"], reduction="add"))
        cur = f"z{i}"
    graph = helper.make_graph(nodes, form, inputs, [_vi(cur, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model, feeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rows", type=int, default=2, help="rows routed to each group (default 2: 8 rows, k=1, 4 groups)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    forms = ["none", "gather-scatter", "dense", "block-diagonal", "gather-only", "moe"]
    runs = {}
    for form in forms:
        model, feeds = build(form, args.rows, rng)
        runs[form] = (ort.InferenceSession(model.SerializeToString(), opts), feeds)
    times = {f: [] for f in forms}
    for _ in range(args.rounds):
        for form in forms:
            session, feeds = runs[form]
            for _ in range(3):
                session.run(None, feeds)
            t0 = time.perf_counter()
            for _ in range(30):
                session.run(None, feeds)
            times[form].append((time.perf_counter() - t0) / 30 * 1e3)
    bare = statistics.median(times["none"])
    print(f"{GROUPS} groups after {GROUPS} {DIM}x{DIM} MatMuls, B={BATCH}, {args.rows} rows per group, rank {RANK}, "
          f"{args.threads} threads, {args.rounds} rounds")
    print("| form | ms per run | LoRA ms per run | us per group |\n|---|---|---|---|")
    for form in forms:
        m = statistics.median(times[form])
        print(f"| {form} | {m:.2f} | {m - bare:.2f} | {(m - bare) / GROUPS * 1e3:.1f} |")


if __name__ == "__main__":
    main()
