"""Routing at its numerical edges: a router whose margins are so large that softmax underflows
(the demo's original export failure), and what "selected" means in every part (reference,
graph, validation, runtime): the router's top-k, never a gate value that can round to 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tenant, tiny_llama
from milora.format.contract import GATE_FLOOR
from milora.format import manifest as mf
from milora.export.exporter import export, load_base
from milora.export.tenants import load_tenants
from milora.export.validate import Row, run_graphs, sessions
from milora.format.config import MiloraConfig
from milora.model.router import top_k_gates
from runtime_helpers import add_word_tokenizer

FAST = dict(progress=False, decode_steps=2)


def test_underflowing_gate_stays_selected_in_the_reference():
    """Paper gates of a 2-of-7 choice whose second logit is 200 below the first: softmax
    gives exactly 0 there, yet the expert is selected, so its gate must not be 0."""
    logits = torch.tensor([[0.0, -200.0, -400.0, -500.0, -600.0, -700.0, -800.0],
                           [0.0, -95.0, -300.0, -300.5, -301.0, -302.0, -303.0]])  # [B, E]
    for mode in ("paper", "renormalized"):
        gates, _ = top_k_gates(logits, 2, mode)
        assert (gates != 0).sum(dim=1).tolist() == [2, 2], mode
        assert gates[0, 1] == GATE_FLOOR and gates[1, 1] == GATE_FLOOR  # exp(-95) is a denormal: raised
        assert torch.equal(gates != 0, torch.zeros_like(gates, dtype=torch.bool).index_fill(1, torch.tensor([0, 1]), True))


def test_nan_router_logits_give_nan_gates_not_zero():
    gates, _ = top_k_gates(torch.tensor([[float("nan")] + [0.0] * 6]), 1, "paper")
    assert torch.isnan(gates).any()


def _scale_routers(directory, factor: float) -> None:
    """Multiply an adapter's router weights by factor: margins of thousands of logits."""
    from safetensors.numpy import load_file, save_file

    from milora.format.contract import ADAPTER_WEIGHTS_FILE

    path = directory / ADAPTER_WEIGHTS_FILE
    tensors = load_file(str(path))
    for name in tensors:
        if name.endswith("router.weight"):
            tensors[name] = tensors[name] * np.float32(factor)
    save_file(tensors, str(path))


@pytest.fixture(scope="module", params=["portable", "fused"])
def huge_margin(request, tmp_path_factory):
    """A tiny base with one k=2 paper-gate tenant whose router margins are in the thousands
    (its second gate underflows to exactly 0 in float32 softmax) and one ordinary tenant, in
    each graph flavour (hidden 64 gives the head dim 16 the fused flavour needs)."""
    import functools

    root = tmp_path_factory.mktemp("huge_margin")
    model_dir = root / "model"
    builder = functools.partial(tiny_llama, hidden=64 if request.param == "fused" else 32)
    builder(0).save_pretrained(str(model_dir))
    add_word_tokenizer(model_dir)
    for seed, name in ((21, "steep"), (22, "plain")):
        tenant(seed, builder=builder, config=MiloraConfig(rank=4, alpha=8, top_k=2)).save_adapter(
            model_dir / "adapters" / name)
    _scale_routers(model_dir / "adapters" / "steep", 1e6)
    out = root / "out"
    manifest = export(model_dir, out, **FAST)
    assert manifest["flavour"] == request.param
    return model_dir, out, manifest


def test_huge_margin_k2_tenant_exports_and_validates(huge_margin):
    model_dir, out, manifest = huge_margin
    v = manifest["validation"]
    assert v["compared_selections"] > 0 and v["skipped_rows"] == [] and v["near_ties"] == 0


def test_huge_margin_gates_select_exactly_k_in_graph_and_reference(huge_margin):
    """The canonical routing has exactly k non-zero gates per layer for a routed row, in the
    PyTorch reference and in the prefill graph, even where softmax underflowed."""
    from milora.model.model import MiloraModel

    model_dir, out, manifest = huge_margin
    hf = load_base(model_dir, "float32")
    steep = {t.name: t for t in load_tenants(model_dir, {}, manifest["base"])}["steep"]
    prompts = [[5, 17, 33, 8, 71], [40, 2, 9]]
    model = MiloraModel(hf, steep.config).eval()
    model.load_adapter_state_dict(steep.tensors)
    with torch.no_grad():
        ref = [model.compute_routing(torch.tensor([p])).gates[0] for p in prompts]  # [L, 7] each
    probs_underflow = any((g[g != 0] == GATE_FLOOR).any() for g in ref)
    assert probs_underflow, "the fixture must make softmax underflow, else this test proves nothing"
    rows = [Row("steep", p, [3, 4]) for p in prompts]
    res = run_graphs(out, manifest, rows, sessions(out, manifest))
    graph = res["prefill"][mf.GATES]  # [B, L, 7]
    for i, r in enumerate(ref):
        assert ((graph[i] != 0).sum(axis=-1) == 2).all()
        assert np.array_equal(graph[i] != 0, r.numpy() != 0)


def test_huge_margin_tenant_serves_like_the_reference(huge_margin):
    """Greedy tokens through the runtime equal the reference's for the huge-margin tenant."""
    from milora.runtime import Engine, SamplingParams
    from runtime_helpers import reference_greedy

    model_dir, out, manifest = huge_margin
    prompt = [7, 11, 13, 17, 19, 23]
    with Engine(out) as engine:
        req = engine.submit("steep", prompt_ids=prompt, params=SamplingParams(max_new_tokens=6, ignore_eos=True))
        engine.run_until_done()
    tokens, margin = reference_greedy(model_dir, "steep", prompt, 6)
    assert margin > 1e-4
    assert req.output_ids == tokens
    assert ((req.gates != 0).sum(axis=-1) == 2).all()
