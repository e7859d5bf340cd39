"""milora-quantize on the tiny exports of both graph flavours (docs/quantization.md): each
precision's graphs run in onnxruntime and the runtime serves the result unchanged; routers and
banks stay float32; the agreement report is computed (exactly 1.0 for float32 against itself,
below 1.0 once a planted router perturbation flips choices, and then the refusal fires);
calibration is routing-aware and its decode feeds carry KV from real prefill runs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from milora.calibration import calibrate
from milora.calibration.feeds import session
from milora.format import feeds as fd
from milora.calibration.agreement import agreement_report
from milora.calibration.quantize import QuantizeOptions, quantize
from milora.errors import AgreementError
from milora.export.branches import split
from milora.format import manifest as mf
from milora.runtime import Engine, SamplingParams

FAST = dict(report_prompts=4, report_steps=2, calib_samples=8, calib_decode_steps=2, progress=False)
# ops each precision must leave in the graphs (onnxruntime's kernels for it)
EXPECTED_OPS = {"fp16": "Cast", "int8-dynamic": "MatMulInteger", "int8-static": "QuantizeLinear", "int4": "MatMulNBits",
                "int8-weight": "MatMulNBits"}


@pytest.fixture(scope="module")
def exported(tiny_any_export):
    return tiny_any_export


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    """precision -> QUANT_DIR, quantized once per flavour (forced: the tiny random models' routers
    have small margins, so int8 / int4 may flip some; the report tells, the tests check it)."""
    _, out_dir = exported
    root = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(precision):
        if precision not in cache:
            cache[precision] = root / precision
            quantize(out_dir, cache[precision], precision=precision, force_agreement=True, **FAST)
        return cache[precision]

    return get


def _phase(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The graph that serves phase `name` as a flat model: the fused flavour's one graph holds
    both phases under one If (branches.split takes that phase's model out); others as they are."""
    return (split(model, mf.ROUTE) or {name: model})[name]


def _graph(root, name):
    m = mf.read_manifest(root)
    return _phase(onnx.load(str(root / m["graphs"][name]["file"]), load_external_data=True), name), m


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
                 "MatMulInteger", "MatMulNBits", "GatherBlockQuantized"}


def _is_fused(model: onnx.ModelProto) -> bool:
    return any(i.name == mf.ROUTE for i in model.graph.input)


def _subgraph_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node inside the If branches of graph (recursively)."""
    out = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += list(attr.g.node) + _subgraph_nodes(attr.g)
    return out


def _router_ops_float32(model: onnx.ModelProto, vocab: int) -> bool:
    """Every MatMul of the routers (graph.plan's router nodes) takes float32 on both sides. The
    fused graph's routers live in its prefill phase's per-layer If branches: there, no node is
    a quantized op or a cast to float16 (the router MatMuls read the float32 router.weight bank)."""
    from milora.calibration import graph as cg

    if _is_fused(model):
        inner = _subgraph_nodes(model.graph)
        return (any(n.op_type == "MatMul" for n in inner) and not any(n.op_type in QUANTIZED_OPS for n in inner)
                and not any(n.op_type == "Cast" and a.name == "to" and a.i == onnx.TensorProto.FLOAT16
                            for n in inner for a in n.attribute))
    cg.name_nodes(model.graph)
    routers = cg.plan(model, vocab).router_nodes
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.name in routers]
    return bool(matmuls) and all(types.get(x) == onnx.TensorProto.FLOAT for n in matmuls for x in n.input)


@pytest.mark.parametrize("precision", ["fp16", "int8-dynamic", "int4", "int8-static", "int8-weight"])
def test_each_precision_runs_and_serves(exported, quantized, precision):
    _, out_dir = exported
    qdir = quantized(precision)
    src = mf.read_manifest(out_dir)
    m = mf.read_manifest(qdir)
    q = m[mf.QUANTIZATION_KEY]
    assert q["precision"] == precision
    # the runtime's contract is the source's: same IO, banks, tenants, flavour
    for key in ("banks", "tenants", "flavour", "dtype", "slots"):
        assert m[key] == src[key], key
    for g in ("prefill", "decode"):
        assert m["graphs"][g]["inputs"] == src["graphs"][g]["inputs"]
        assert m["graphs"][g]["outputs"] == src["graphs"][g]["outputs"]
        model, _ = _graph(qdir, g)
        ops = {n.op_type for n in model.graph.node}
        assert EXPECTED_OPS[precision] in ops, (g, sorted(ops))
    prefill, _ = _graph(qdir, "prefill")
    assert _router_ops_float32(prefill, m["base"]["vocab_size"]), "a router MatMul is not float32"
    smaller = q["weights_bytes"] / q["source"]["weights_bytes"]
    assert smaller < {"fp16": 0.6, "int8-dynamic": 0.45, "int8-static": 0.45, "int4": 0.35, "int8-weight": 0.6}[precision], \
        smaller
    if precision in ("int4", "int8-weight"):  # the bits asked for, and int8-weight's embedding float32
        bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert bits == {4 if precision == "int4" else 8}, bits
        assert ("GatherBlockQuantized" in ops) == (precision == "int4"), sorted(ops)
    # served unchanged, every tenant and the bare base model, in one mixed batch
    with Engine(qdir, max_batch=8) as engine:
        reqs = engine.generate_batch([{"tenant": t, "prompt_ids": [5, 6, 7, 8 + i],
                                       "params": SamplingParams(max_new_tokens=3, ignore_eos=True)}
                                      for i, t in enumerate([*m["tenants"], None])])
    assert all(len(r.output_ids) == 3 and all(0 <= x < m["base"]["vocab_size"] for x in r.output_ids) for r in reqs)
    # the report was computed and written
    report = json.loads((qdir / "quantization" / "agreement.json").read_text())
    assert (qdir / "quantization" / "agreement.png").stat().st_size > 1000
    for t, v in report["tenants"].items():
        assert 0.0 <= v["routing_agreement"] <= 1.0 and 0.0 <= v["next_token_agreement"] <= 1.0, (t, v)
        assert v["decided"] + v["near_ties"] == v["selections"] == FAST["report_prompts"] * m["base"]["num_layers"]
        assert v["kl_mean"] >= 0.0
    assert q["agreement"]["routing_agreement_min"] == min(v["routing_agreement"] for v in report["tenants"].values())


def test_float32_against_itself_agrees_exactly(exported):
    _, out_dir = exported
    m = mf.read_manifest(out_dir)
    opts = QuantizeOptions(report_prompts=6, report_steps=3)
    report = agreement_report(out_dir, out_dir, m, opts)
    assert set(report["tenants"]) == set(m["tenants"])
    for t, v in report["tenants"].items():
        assert v["routing_agreement"] == 1.0 and v["next_token_agreement"] == 1.0, (t, v)
        assert v["kl_max"] == 0.0 and v["near_tie_agreement"] in (None, 1.0), (t, v)
        assert v["positions"] == 6 * 4


def _plant_router_flip(model: onnx.ModelProto, graph: str, plan) -> None:
    """Negate layer 0's router logits in the quantized prefill graph: every routed tenant now
    picks its LOWEST-scoring experts there."""
    if graph != "prefill":
        return
    if _is_fused(model):  # the fused graph: layer 0's router is in the first If's branches
        return _plant_in_branches(model)
    target = plan.router_logits[0]
    assert target is not None, "no router logits found in the quantized prefill graph"
    planted = target + "_planted"
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            if x == target:
                node.input[i] = planted
    model.graph.node.append(onnx.helper.make_node("Neg", [target], [planted], name="planted_router_flip"))
    # keep the graph topologically sorted: move the new node right after the producer
    nodes = list(model.graph.node)
    producer = next(i for i, n in enumerate(nodes) if target in n.output)
    nodes.insert(producer + 1, nodes.pop())
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _branch_reading(graph: onnx.GraphProto, name: str) -> onnx.GraphProto | None:
    """The first (depth-first) If branch under graph with a node reading `name` directly."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                if any(name in n.input for n in attr.g.node):
                    return attr.g
                found = _branch_reading(attr.g, name)
                if found is not None:
                    return found
    return None


def _plant_in_branches(model: onnx.ModelProto) -> None:
    """Negate the output of layer 0's router MatMul (the MatMul fed by the router.weight bank,
    inside the fused graph's first If) in place."""
    branch = _branch_reading(model.graph, mf.ROUTER_WEIGHT)
    assert branch is not None, "no router in the fused graph's branches"
    reached = {o for n in branch.node if mf.ROUTER_WEIGHT in n.input for o in n.output}
    nodes = list(branch.node)
    for i, node in enumerate(nodes):
        if any(x in reached for x in node.input):
            if node.op_type == "MatMul":
                target, planted = node.output[0], node.output[0] + "_planted"
                for other in nodes[i + 1:]:
                    other.input[:] = [planted if x == target else x for x in other.input]
                for out in branch.output:
                    assert out.name != target
                nodes.insert(i + 1, onnx.helper.make_node("Neg", [target], [planted], name="planted_router_flip"))
                del branch.node[:]
                branch.node.extend(nodes)
                return
            reached.update(node.output)
    raise AssertionError("no router MatMul after the router.weight gather")


def test_planted_router_perturbation_is_caught_and_refused(exported, tmp_path):
    _, out_dir = exported
    # without the plant, fp16 keeps every routing choice: not refused at the default threshold
    clean = quantize(out_dir, tmp_path / "clean", precision="fp16", **FAST)
    assert clean[mf.QUANTIZATION_KEY]["agreement"]["routing_agreement_min"] == 1.0
    with pytest.raises(AgreementError) as info:
        quantize(out_dir, tmp_path / "planted", precision="fp16", transform=_plant_router_flip, **FAST)
    msg, report = str(info.value), info.value.report
    assert "below the threshold 0.99" in msg and "--force-agreement" in msg
    worst = report["summary"]["routing_agreement_min"]
    assert worst < 0.99 and f"{worst:.4f}" in msg
    assert not (tmp_path / "planted").exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    # layer 0's choice flipped for every routed row whose margin is decided; layer 1 follows the
    # changed hidden state or not, so only layer 0 is asserted
    for t, v in report["tenants"].items():
        assert v["routing_agreement"] < 1.0, (t, v)
        assert any(f["layer"] == 0 for f in v["flips"]), (t, v["flips"])
    forced = quantize(out_dir, tmp_path / "planted", precision="fp16", transform=_plant_router_flip,
                      force_agreement=True, **FAST)
    agreement = forced[mf.QUANTIZATION_KEY]["agreement"]
    assert agreement["forced"] and set(agreement["below_threshold"]) == set(forced["tenants"])


def test_calibration_is_routing_aware_and_decode_uses_real_prefill_kv(exported):
    _, out_dir = exported
    m = mf.read_manifest(out_dir)
    opts = SimpleNamespace(calibration=None, calib_samples=8, calib_decode_steps=2, seed=0)
    cs = calibrate.calibration_set(out_dir, m, opts)
    cov = cs.coverage
    assert cov["paths_covered"] == cov["paths_used"] and all(v > 0 for v in cov["paths_used"].values())
    # prefill batches mix tenants
    assert any(len(set(f[mf.TENANT_SLOTS].tolist())) > 1 for f in cs.prefill)
    # the first decode feeds continue the first prefill batch: its past KV is that prefill's present
    sess = session(out_dir / m["graphs"]["prefill"]["file"])
    out = fd.run(sess, cs.prefill[0])
    first = cs.decode[0]
    key, present = mf.past_key(0), out[mf.present_key(0)]
    t = present.shape[2]
    assert np.abs(present).sum() > 0
    np.testing.assert_array_equal(first[key][:, :, :t] if fd.is_fused(m) else first[key], present)
    assert len(cs.decode) == len(cs.prefill) * 2
    # each phase is calibrated on its own feeds; a graph that serves both and cannot be split
    # (a fused export with an If per layer) reads both phases' feeds, whichever role it plays
    ids = lambda feeds: [id(f[mf.INPUT_IDS]) for f in feeds]  # noqa: E731
    assert _read(cs, "prefill") == ids(cs.prefill) and _read(cs, "decode") == ids(cs.decode)
    both = cs.both_phases()
    assert _read(both, "prefill") == _read(both, "decode") == ids(cs.prefill + cs.decode)


def _read(cs, graph: str) -> list[int]:
    """What onnxruntime's calibrator gets from cs.reader(graph), as the identities of its input_ids."""
    reader, out = cs.reader(graph), []
    while (feeds := reader.get_next()) is not None:
        out.append(id(feeds[mf.INPUT_IDS]))
    return out


def test_routing_aware_selection_covers_every_path():
    cands = {"a": [{(0, 1)}, {(0, 1), (1, 2)}, {(1, 3)}, set()], "b": [{(0, 0)}, {(0, 0)}]}
    chosen = calibrate.select_routing_aware(cands, budget=2)
    for t, picks in chosen.items():
        assert set().union(*(cands[t][i] for i in picks)) == set().union(*cands[t])
    assert chosen["a"] == [1, 2]  # the greedy cover takes the widest candidate first
    more = calibrate.select_routing_aware(cands, budget=6)
    assert sum(len(v) for v in more.values()) == 6


@pytest.mark.parametrize("precision", ["int8-static", "fp8"])
def test_tensorrt_qdq_graphs(tiny_export, tmp_path, precision):
    """--target tensorrt: explicit quantization as TensorRT takes it: Q/DQ pairs, symmetric
    (zero points 0), int8 or float8 e4m3 (opset >= 19), weights per output channel, no quantized
    Gather; onnxruntime still runs them (simulated quantization), so the report is computed."""
    _, out_dir = tiny_export
    m = quantize(out_dir, tmp_path / "q", precision=precision, target="tensorrt", force_agreement=True, **FAST)
    want = onnx.TensorProto.INT8 if precision == "int8-static" else onnx.TensorProto.FLOAT8E4M3FN
    for g in ("prefill", "decode"):
        model, _ = _graph(tmp_path / "q", g)
        inits = {t.name: t for t in model.graph.initializer}
        q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        dq_nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert q_nodes and dq_nodes
        for n in q_nodes + dq_nodes:
            zp = onnx.numpy_helper.to_array(inits[n.input[2]]) if n.input[2] in inits else None
            assert zp is not None and inits[n.input[2]].data_type == want
            assert not np.any(zp.astype(np.float32)), n.name
        weight_dq = [n for n in dq_nodes if n.input[0] in inits]
        assert weight_dq and all(len(inits[n.input[1]].dims) == 1 for n in weight_dq)  # per channel
        assert not any(n.op_type == "Gather" and n.input[0] not in inits and n.input[0].endswith("DequantizeLinear_Output")
                       for n in model.graph.node)
        if precision == "fp8":
            assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    q = m[mf.QUANTIZATION_KEY]
    assert q["target"] == "tensorrt" and q["agreement"]["routing_agreement_min"] is not None
    assert "embedding" in q["high_precision"]


def test_milora_quantize_imports_no_torch(tiny_export, tmp_path):
    """The command (calibration, quantization, report) runs without torch or transformers."""
    import subprocess
    import sys
    from pathlib import Path

    _, out_dir = tiny_export
    code = ("import sys; from milora.calibration.cli import main; "
            f"rc = main([{str(out_dir)!r}, {str(tmp_path / 'q')!r}, '--precision', 'int8-static', '--quiet', "
            "'--force-agreement', '--report-prompts', '2', '--report-steps', '1', '--calib-samples', '4']); "
            "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert res.stdout.strip().splitlines()[-1] == "0 []", res.stdout + res.stderr
    assert (tmp_path / "q" / "manifest.json").is_file()


def _weight_inputs(model: onnx.ModelProto) -> dict[str, int]:
    """node name -> data type of the initializer each MatMul / Gather reads as its weight."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            out[n.name] = inits[n.input[1]]
        elif n.op_type == "Gather" and n.input[0] in inits:
            out[n.name] = inits[n.input[0]]
    return out


def test_int4_without_lm_head_keeps_it_float32(tiny_fused_export, tmp_path):
    """--no-lm-head with int4: the LM head MatMul keeps its float32 weight in both graphs
    (onnxruntime's MatMulNBits quantizer takes nodes_to_include as an addition to the op types
    it quantizes, so the node has to be excluded by name)."""
    from milora.calibration import graph as cg

    _, out_dir = tiny_fused_export
    m = quantize(out_dir, tmp_path / "q", precision="int4", lm_head=False, force_agreement=True, **FAST)
    for g in ("prefill", "decode"):
        model, _ = _graph(tmp_path / "q", g)
        cg.name_nodes(model.graph)
        plan = cg.plan(model, m["base"]["vocab_size"])
        assert plan.lm_head and plan.weight_matmuls == plan.lm_head  # the only float weight MatMul left
        assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 4 * m["base"]["num_layers"]


@pytest.mark.parametrize("precision", ["int4", "int8-dynamic", "int8-static"])
def test_keep_float_matmuls_stay_float32_and_are_recorded(exported, tmp_path, precision):
    """--keep-float: the selected weight MatMuls keep their float32 weights in both graphs (by
    site, though node names differ between prefill and decode), every other one is quantized,
    and the manifest lists them. int4 also keeps the LM head float32 with --no-lm-head
    (onnxruntime's nodes_to_include alone would quantize it anyway)."""
    from milora.calibration import graph as cg
    from milora.calibration import mixed

    _, out_dir = exported
    src = mf.read_manifest(out_dir)
    m = quantize(out_dir, tmp_path / "q", precision=precision, keep_float=["layers.0.down_proj", "layers.1"],
                 lm_head=False, force_agreement=True, **FAST)
    nl = src["base"]["num_layers"]
    assert nl == 2
    for g in ("prefill", "decode"):
        source = _phase(onnx.load(str(out_dir / src["graphs"][g]["file"]), load_external_data=True), g)
        cg.name_nodes(source.graph)
        named = mixed.sites(source, cg.plan(source, src["base"]["vocab_size"]), src["base"])
        kept = {s for s in named if s.startswith("layers.1.")} | {"layers.0.down_proj", "lm_head"}
        quantized_graph, _ = _graph(tmp_path / "q", g)
        weights = _weight_inputs(quantized_graph)
        for site, node in named.items():
            if site in kept:
                assert weights.get(node) == onnx.TensorProto.FLOAT, (g, site, node)
            elif site != "embedding" and precision != "int8-static":  # int8-static: a MatMul reading a DQ'd weight
                assert node not in weights, (g, site, node)
        assert m[mf.QUANTIZATION_KEY]["graphs"][g]["kept_float"] == [s for s in named if s in kept - {"lm_head"}]
        if precision == "int8-static":
            dq = {n.output[0] for n in quantized_graph.graph.node if n.op_type == "DequantizeLinear"}
            by_name = {n.name: n for n in quantized_graph.graph.node}
            quantized = [s for s in named if s not in kept and s != "embedding"]
            assert quantized and all(by_name[named[s]].input[1] in dq for s in quantized)
    record = m[mf.QUANTIZATION_KEY]["keep_float"]
    assert record["selectors"] == ["layers.0.down_proj", "layers.1"] and record["search"] is None
    assert "layers.0.down_proj" in record["matmuls"] and "layers.1.down_proj" in record["matmuls"]
    assert not any(s.startswith("layers.0.") and s != "layers.0.down_proj" for s in record["matmuls"])
    assert record["weights_bytes_float32"] > 0
    assert "--keep-float layers.0.down_proj layers.1" in m[mf.QUANTIZATION_KEY]["high_precision"]["kept weight MatMuls"]
    assert m[mf.QUANTIZATION_KEY]["options"]["keep_float"] == ["layers.0.down_proj", "layers.1"]


def test_keep_float_selectors_name_structural_sites():
    """Selectors read the structural site names, either flavour: a portable module matches the
    fused MatMul that computes it; ranges, groups and the checkpoint's spelling are understood."""
    from milora.calibration import mixed

    portable = [f"layers.{l}.{m}" for l in range(3) for m in mixed.PORTABLE] + ["lm_head", "embedding"]
    fused = [f"layers.{l}.{m}" for l in range(3) for m in mixed.FUSED] + ["lm_head"]
    assert mixed.select(portable, ["down_proj"]) == [f"layers.{l}.down_proj" for l in range(3)]
    assert mixed.select(portable, ["layers.1-2.mlp.up_proj"]) == ["layers.1.up_proj", "layers.2.up_proj"]
    assert mixed.select(portable, ["model.layers.0.self_attn.k_proj"]) == ["layers.0.k_proj"]
    assert mixed.select(portable, ["layers.0,2.attn"]) == [f"layers.{l}.{m}" for l in (0, 2) for m in mixed.PORTABLE[:4]]
    assert mixed.select(fused, ["q_proj"]) == [f"layers.{l}.qkv_proj" for l in range(3)]
    assert mixed.select(fused, ["layers.2.mlp"]) == ["layers.2.gate_up_proj", "layers.2.down_proj"]
    assert mixed.select(fused, ["lm_head", "layers.0.o_proj"]) == ["layers.0.o_proj", "lm_head"]
    assert mixed.compress(["embedding", "layers.0.qkv_proj", "layers.0.o_proj", "layers.0.gate_up_proj",
                           "layers.0.down_proj", "layers.1.qkv_proj"], ["embedding", *fused[:-1]]) == \
        ["layers.0", "embedding", "layers.1.qkv_proj"]


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_auto_keep_stops_at_the_threshold(tiny_fused_export, tmp_path, threshold):
    """--auto-keep keeps the fewest leading sites float32 whose routing agreement on the search
    prompts reaches the threshold: the kept count passed, one fewer was measured and failed
    (or nothing is kept when fully quantized passes), and the graphs keep exactly those."""
    from milora.calibration import mixed

    _, out_dir = tiny_fused_export
    m = quantize(out_dir, tmp_path / "q", precision="int4", auto_keep=True, threshold=threshold,
                 force_agreement=True, **FAST)
    record = m[mf.QUANTIZATION_KEY]["keep_float"]
    search = record["search"]
    by_kept = {t["kept"]: t for t in search["trials"]}
    k = search["kept"]
    assert search["reached"] and by_kept[k]["min"] >= threshold
    if threshold == 0.0:
        assert k == 0 and len(search["trials"]) == 1 and record["matmuls"] == []
    else:
        assert k > 0 and by_kept[k - 1]["min"] < threshold  # one fewer kept fails
        chain = ["embedding"] + [f"layers.{l}.{s}" for l in range(2) for s in mixed.FUSED]
        assert record["selectors"] == mixed.compress(chain[:k], chain)
        assert set(record["matmuls"]) == set(chain[:k])
        assert all(t["min"] < threshold for t in search["trials"] if t["kept"] < k)
    assert m[mf.QUANTIZATION_KEY]["options"]["auto_keep"] is True


def test_fused_phases_share_their_quantized_weights(tiny_fused_export, tmp_path):
    """milora-quantize quantizes the fused graph's two phases apart and joins them (branches.join):
    a weight both phases quantized the same way is stored once, and fp16's Cast of a stored
    weight stands once in the main graph (in each branch, onnxruntime would fold it into a
    float32 copy per branch), so both branches read one copy."""
    _, out_dir = tiny_fused_export
    for precision in ("fp16", "int4"):
        qdir = tmp_path / precision
        m = quantize(out_dir, qdir, precision=precision, force_agreement=True, report=False, progress=False)
        model = onnx.load(str(qdir / m["graphs"]["prefill"]["file"]), load_external_data=False)
        weights = {i.name for i in model.graph.initializer}
        parts = split(model, mf.ROUTE)
        assert parts is not None
        reads = {x for n in _subgraph_nodes(model.graph) for x in n.input}  # what the branches read
        if precision == "fp16":
            casts = [n for n in model.graph.node if n.op_type == "Cast"]
            assert casts and all(n.input[0] in weights for n in casts)
            inner = [n for n in _subgraph_nodes(model.graph) if n.op_type == "Cast" and n.input[0] in weights]
            assert not inner, [n.name for n in inner]
        else:
            nbits = {role: {n.input[1] for n in p.graph.node if n.op_type == "MatMulNBits"} for role, p in parts.items()}
            assert nbits["prefill"] and nbits["prefill"] == nbits["decode"]  # the same quantized weights, by name
            assert nbits["prefill"] <= weights and nbits["prefill"] <= reads
