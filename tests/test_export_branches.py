"""The fused flavour's one graph: milora::Select nodes become If branches that hold only the
nodes their side needs (milora/export/branches.py), and the runtime opens the graph once."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from milora.export.branches import select_to_if
from milora.export.fused_ops import select
from milora.format import manifest as mf


class Nested(torch.nn.Module):
    """out = select(c1, [select(c2, [exp(x) * 3], [x - 1])[0] + shared], [y * 2])[0] + shared,
    shared = x + y read by both the then side and the main graph."""

    def forward(self, c1, c2, x, y):
        shared = x + y
        inner = select(c2, [torch.exp(x) * 3.0], [x - 1.0])[0]
        outer = select(c1, [torch.sin(inner + shared)], [y * 2.0])[0]
        return outer + shared


def _export(tmp_path) -> onnx.ModelProto:
    args = (torch.tensor(True), torch.tensor(True), torch.rand(2, 3), torch.rand(2, 3))
    path = tmp_path / "m.onnx"
    torch.onnx.export(Nested(), args, str(path), dynamo=False, opset_version=18,
                      input_names=["c1", "c2", "x", "y"], output_names=["out"])
    model = onnx.load(str(path))
    assert sum(n.op_type == "Select" for n in model.graph.node) == 2  # traced as placeholders
    assert select_to_if(model) == 2
    onnx.checker.check_model(model, full_check=True)
    return model


def _branches(node: onnx.NodeProto) -> tuple[onnx.GraphProto, onnx.GraphProto]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return attrs["then_branch"], attrs["else_branch"]


def _ops(graph: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in graph.node]


def test_selects_become_ifs_holding_only_their_sides_nodes(tmp_path):
    model = _export(tmp_path)
    main = _ops(model.graph)
    assert "Select" not in main and main.count("If") == 1  # the inner If moved into the outer's branch
    outer = next(n for n in model.graph.node if n.op_type == "If")
    then_b, else_b = _branches(outer)
    assert "Sin" in _ops(then_b) and "If" in _ops(then_b) and "Mul" not in _ops(then_b)
    assert "Mul" in _ops(else_b) and "Sin" not in _ops(else_b)
    assert main.count("Add") == 2  # shared = x + y stays outside (the main graph reads it too)
    inner = next(n for n in then_b.node if n.op_type == "If")
    inner_then, inner_else = _branches(inner)
    assert "Exp" in _ops(inner_then) and "Sub" not in _ops(inner_then) and "Sub" in _ops(inner_else)
    assert not any(op in main for op in ("Exp", "Sin", "Sub"))  # nothing of the sides is computed always


@pytest.mark.parametrize("c1,c2", [(True, True), (True, False), (False, True), (False, False)])
def test_the_if_graph_computes_what_eager_pytorch_does(tmp_path, c1, c2):
    model = _export(tmp_path)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, y = torch.rand(2, 3), torch.rand(2, 3)
    want = Nested()(torch.tensor(c1), torch.tensor(c2), x, y).numpy()
    got = sess.run(None, {"c1": np.array(c1), "c2": np.array(c2), "x": x.numpy(), "y": y.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fused_export_is_one_graph_opened_once(tiny_fused_export):
    from milora.runtime.fused_backend import FusedOrtBackend

    _, out = tiny_fused_export
    m = mf.read_manifest(out)
    assert m["graphs"]["prefill"]["file"] == m["graphs"]["decode"]["file"] == mf.MODEL_FILE
    assert m["graphs"]["prefill"]["inputs"] == m["graphs"]["decode"]["inputs"]
    assert sorted(p.name for p in out.glob("*.onnx")) == [mf.MODEL_FILE]
    model = onnx.load(str(out / mf.MODEL_FILE), load_external_data=False)
    # One If on ROUTE: the prefill's model (routers in an If per layer, skipped when no row is
    # routed) and decode's (no branch, no router, no bank read), over one set of weights.
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 1 and ifs[0].input[0] == mf.ROUTE
    prefill, decode = _branches(ifs[0])
    assert _ops(prefill).count("If") == m["base"]["num_layers"]
    assert "If" not in _ops(decode)
    assert not {x for n in decode.node for x in n.input} & set(mf.bank_names("prefill"))
    assert not any(n.op_type == "MatMul" for n in model.graph.node)  # every projection is in a branch
    weights = {i.name for i in model.graph.initializer}
    shared = {x for n in prefill.node if n.op_type == "MatMul" for x in n.input} & weights
    assert shared and shared == {x for n in decode.node if n.op_type == "MatMul" for x in n.input} & weights
    backend = FusedOrtBackend(out, m)
    try:
        assert backend.sessions["prefill"] is backend.sessions["decode"]
    finally:
        backend.close()


def test_prefill_router_logits_and_gates_agree(tiny_fused_export):
    """The router_logits output is what the gates were chosen from: for each routed row and
    layer, the selected experts are the top-k of its logits among the tenant's experts; a
    base row (slot 0) gets zero gates and zero logits; decode outputs zeros for both."""
    from milora.format import feeds as fd
    from milora.format.contract import EXPERT_INDEX
    from milora.format.pack import assemble_banks, default_slots

    _, out = tiny_fused_export
    m = mf.read_manifest(out)
    slots = default_slots(m)
    banks = assemble_banks(out, m, slots)
    routed = [t for t in sorted(m["tenants"]) if m["tenants"][t]["config"].get("routed", True)]
    assert len(routed) >= 2
    rows = [slots.index(t) for t in routed] + [0]
    prompts = [[5 + i, 6, 7, 8, 9][: 3 + i % 3] for i in range(len(rows))]
    sess = ort.InferenceSession(str(out / mf.MODEL_FILE), providers=["CPUExecutionProvider"])
    batch = fd.prefill_feeds(m, prompts, rows, banks)
    res = fd.run(sess, batch.feeds)
    gates, z = res[mf.GATES], res[mf.ROUTER_LOGITS]
    for i, t in enumerate(routed):
        cfg = m["tenants"][t]["config"]
        experts = [EXPERT_INDEX[e] for e in cfg["experts"]]
        for layer in range(m["base"]["num_layers"]):
            top = sorted(experts, key=lambda e: -z[i, layer, e])[: cfg["top_k"]]
            assert sorted(np.flatnonzero(gates[i, layer]).tolist()) == sorted(top), (t, layer, z[i, layer])
    assert not gates[-1].any() and not z[-1].any()
    decoded = []
    for _ in fd.decode_feeds(m, batch, res, banks, 1, lambda s: [3] * len(rows),
                             lambda feeds: decoded.append(fd.run(sess, feeds)) or decoded[-1]):
        pass
    assert not decoded[0][mf.GATES].any() and not decoded[0][mf.ROUTER_LOGITS].any()


def test_split_phases_run_alone_and_join_back(tiny_fused_export):
    """branches.split cuts the fused graph into its prefill and decode models, each of which
    computes what the graph computes in that phase; join puts them back (the same outputs,
    every weight once), and a weight the two phases hold differently under one name is kept
    apart (renamed) rather than merged."""
    from milora.export.branches import join, split
    from milora.format import feeds as fd
    from milora.format.pack import assemble_banks, default_slots

    _, out = tiny_fused_export
    m = mf.read_manifest(out)
    model = onnx.load(str(out / mf.MODEL_FILE))
    parts = split(model, mf.ROUTE)
    assert set(parts) == {"prefill", "decode"}
    assert not any(n.op_type == "If" and n.input[0] == mf.ROUTE for p in parts.values() for n in p.graph.node)
    joined = join(parts, model, mf.ROUTE)
    assert sorted(i.name for i in joined.graph.initializer) == sorted(i.name for i in model.graph.initializer)
    open_ = lambda proto: ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    whole, again, pre, dec = open_(model), open_(joined), open_(parts["prefill"]), open_(parts["decode"])
    slots = default_slots(m)
    banks = assemble_banks(out, m, slots)
    tenants = sorted(m["tenants"])[:3]
    batch = fd.prefill_feeds(m, [[5, 6, 7], [8, 9, 10, 11], [3, 4]], [slots.index(t) for t in tenants], banks,
                             capacity=8)
    want = fd.run(whole, batch.feeds)
    assert want[mf.GATES].any()
    for sess in (again, pre):
        got = fd.run(sess, batch.feeds)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    steps = []
    for _ in fd.decode_feeds(m, batch, want, banks, 1, lambda s: [4, 5, 6],
                             lambda feeds: steps.append([fd.run(s, feeds) for s in (whole, again, dec)]) or steps[-1][0]):
        pass
    for got in steps[0][1:]:
        for k in steps[0][0]:
            np.testing.assert_array_equal(got[k], steps[0][0][k], err_msg=k)
    # a weight the decode phase changed (as a quantizer might): joined apart, each phase its own
    dec_model = parts["decode"]
    name = next(n.input[1] for n in dec_model.graph.node if n.op_type == "MatMul"
                and n.input[1] in {i.name for i in dec_model.graph.initializer})
    init = next(i for i in dec_model.graph.initializer if i.name == name)
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 2.0, name))
    apart = join(parts, model, mf.ROUTE)
    names = {i.name for i in apart.graph.initializer}
    assert name in names and f"{name}/decode" in names and len(names) == len(model.graph.initializer) + 1
    open_(apart)


def test_export_without_tenants_is_the_plain_graph(tmp_path):
    """No tenants: no If, router or LoRA input, and gate and up as two MatMuls (no Split, which
    costs onnxruntime more than a MatMul); the export's validation against PyTorch passed, and
    greedy generation equals transformers' on the same model."""
    from transformers import AutoModelForCausalLM

    from export_helpers import make_model_dir
    from milora.export.exporter import export
    from milora.runtime import Engine, SamplingParams
    from runtime_helpers import add_word_tokenizer

    model_dir = make_model_dir(tmp_path, tenants={}, hidden=64)
    add_word_tokenizer(model_dir)
    m = export(model_dir, tmp_path / "out", progress=False)
    assert m["flavour"] == mf.FLAVOUR_FUSED and not m["tenants"]
    assert max(m["validation"]["max_error"].values()) < 1e-4
    model = onnx.load(str(tmp_path / "out" / mf.MODEL_FILE), load_external_data=False)
    ops = _ops(model.graph)
    layers = m["base"]["num_layers"]
    assert "If" not in ops and "Split" not in ops
    assert ops.count("MatMul") == 5 * layers + 1  # qkv, o, gate, up, down per layer; the LM head
    assert not [i.name for i in model.graph.input if i.name.startswith("lora.") or i.name == mf.ROUTE]
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = [5, 17, 33, 2, 60, 41, 9]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    with Engine(tmp_path / "out", verify=False) as engine:
        got = engine.submit(None, prompt_ids=prompt, params=SamplingParams(max_new_tokens=8, ignore_eos=True))
        engine.run_until_done()
    assert got.output_ids == want
