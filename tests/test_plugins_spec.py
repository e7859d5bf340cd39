"""The TensorRT plugin's logic without TensorRT (milora.plugins.plugin_spec) and, where
TensorRT exists, the registered plugin itself (marked tensorrt)."""

from __future__ import annotations

import importlib.util

import pytest

from milora.errors import DependencyError, EngineBuildError
from milora.export import routed_lora as rl
from milora.plugins import launch
from milora.plugins import plugin_spec as spec

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NEEDS_TRT = pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (it needs an NVIDIA GPU; pip install "
                               "'milora[tensorrt,kernels]'): this registers milora::RoutedLora with tensorrt.plugin "
                               "(and builds a one-node engine to compare with the PyTorch reference)")
GOOD_TYPES = ["HALF", "HALF", "HALF", "HALF", "INT64", "FLOAT"]
RANKS = [3, 3, 4, 4, 1, 2]


def test_op_spec_reads_the_exporters_constants_without_torch():
    import subprocess
    import sys

    from milora.plugins import op_spec
    from plugins_helpers import ROOT, python_env

    for name in op_spec.NAMES:
        assert getattr(op_spec, name) == getattr(rl, name), name
    code = ("import sys; from milora.plugins import op_spec; assert op_spec.OP_TYPE; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], env=python_env(False), cwd=ROOT).returncode == 0


def test_names_come_from_the_exporters_spec():
    assert spec.PLUGIN_ID == f"{rl.PLUGIN_NAMESPACE}::{rl.OP_TYPE}" == "milora::RoutedLora"
    assert spec.PLUGIN_VERSION == rl.PLUGIN_VERSION == "1"
    assert spec.ATTRIBUTES == ("layer", "expert")
    assert spec.INPUTS == tuple(n for n, _, _ in rl.SPEC["inputs"])


def test_the_exported_node_is_what_the_parser_maps_to_the_plugin():
    """keep_as_plugin tags each node with the strings TensorRT's parser reads; the plugin id is
    "<plugin_namespace>::<op_type>" and its attributes are the node's int attributes."""
    import onnx
    from onnx import helper

    from milora.export.lowering import keep_as_plugin

    node = helper.make_node(rl.OP_TYPE, spec.INPUTS, ["y"], domain=rl.DOMAIN, layer=1, expert=4)
    graph = helper.make_graph([node], "g", [], [])
    model = keep_as_plugin(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert f"{attrs['plugin_namespace'].decode()}::{model.graph.node[0].op_type}" == spec.PLUGIN_ID
    assert attrs["plugin_version"].decode() == spec.PLUGIN_VERSION
    assert {n for n, v in attrs.items() if isinstance(v, int)} == set(spec.ATTRIBUTES)
    assert model.graph.node[0].attribute[0].type == onnx.AttributeProto.INT


@pytest.mark.parametrize("data", ["FLOAT", "HALF", "BF16"])
def test_descriptor_output_has_base_outs_type(data):
    assert spec.check_io([data] * 4 + ["INT64", "FLOAT"], RANKS) == data
    assert spec.kernel_dtype(data) in ("float32", "float16", "bfloat16")


@pytest.mark.parametrize("types, ranks, message", [
    (["HALF", "FLOAT", "HALF", "HALF", "INT64", "FLOAT"], RANKS, r"have types \['HALF', 'FLOAT', 'HALF', 'HALF'\]"),
    (["INT8"] * 4 + ["INT64", "FLOAT"], RANKS, r"expected one of \['BF16', 'FLOAT', 'HALF'\]"),
    (GOOD_TYPES[:4] + ["INT32", "FLOAT"], RANKS, r"tenant_slots has type INT32, expected INT64"),
    (GOOD_TYPES[:5] + ["HALF"], RANKS, r"layer_gates has type HALF, expected FLOAT"),
    (GOOD_TYPES, [3, 3, 4, 3, 1, 2], r"lora_B has rank 3, expected 4"),
    (GOOD_TYPES[:5], RANKS[:5], r"takes 6 inputs"),
])
def test_descriptor_refuses_other_inputs(types, ranks, message):
    with pytest.raises(EngineBuildError, match=message):
        spec.check_io(types, ranks)


def test_autotune_covers_every_position_once_and_every_tactic():
    positions = sorted(p for group, _ in spec.AUTOTUNE_TYPES for p in group)
    assert positions == list(range(len(spec.INPUTS) + 1))
    assert spec.tactic_ids() == list(launch.TACTICS)
    assert dict((tuple(g), t) for g, t in spec.AUTOTUNE_TYPES)[tuple(spec.DATA_POSITIONS)] == "FP32|FP16|BF16"


def test_unknown_tactics_fall_back_to_a_decode_shape():
    assert spec.known_tactic(5) == 5
    for t in (0, None, 99):
        assert launch.TACTICS[spec.known_tactic(t)].decode


def test_in_place_is_the_default(monkeypatch):
    monkeypatch.delenv(spec.OUT_OF_PLACE_ENV, raising=False)
    assert spec.in_place()
    monkeypatch.setenv(spec.OUT_OF_PLACE_ENV, "1")
    assert not spec.in_place()


def test_static_rank():
    assert spec.static_dim(16, "rank") == 16
    for bad in (None, -1, 0, True):
        with pytest.raises(EngineBuildError, match="must be fixed when the engine is built"):
            spec.static_dim(bad, "rank")


def test_launch_config_with_numbers_and_symbols():
    dims = [[4, 33, 64], [4, 33, 96], [5, 2, 64, 16], [5, 2, 16, 96], [4], [4, 7]]
    params = launch.kernel_params(5, 16)  # block_t 32, block_n 128
    cfg = spec.launch_config(dims, 1, 6, params, launch.cdiv)
    assert cfg["grid"] == launch.grid(4, 33, 96, params) == (4, 2, 1)
    assert cfg["block"] == (128, 1, 1)
    assert cfg["scalars"] == launch.problem([tuple(d) for d in dims], 1, 6).scalars()

    class Sym:  # stands for a TensorRT shape expression: records the arithmetic
        def __init__(self, text):
            self.text = text

    sym = [[Sym(f"d{i}{j}") for j in range(len(d))] for i, d in enumerate(dims)]
    cfg = spec.launch_config(sym, 0, 2, params, lambda a, b: Sym(f"cdiv({a.text},{b})"))
    assert [g.text for g in cfg["grid"]] == ["d00", "cdiv(d01,32)", "cdiv(d12,128)"]
    assert [getattr(v, "text", v) for v in cfg["scalars"]] == ["d00", "d01", "d02", "d12", "d23", "d20", "d21",
                                                               "d51", 0, 2]


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_registering_says_what_to_install():
    from milora.plugins import trt_plugin

    with pytest.raises(DependencyError, match=r"TensorRT is not installed .*pip install 'milora\[tensorrt\]'"):
        trt_plugin.register()


@pytest.mark.tensorrt
@NEEDS_TRT
def test_plugin_registers_under_the_exporters_name():
    import tensorrt as trt

    from milora.plugins import trt_plugin

    trt_plugin.register()
    trt_plugin.register()  # idempotent
    creator = trt.get_plugin_registry().get_creator(rl.OP_TYPE, spec.PLUGIN_VERSION, rl.PLUGIN_NAMESPACE)
    assert creator is not None


@pytest.mark.tensorrt
@NEEDS_TRT
@pytest.mark.parametrize("plugin", ["aot", "jit"])
def test_one_node_engine_matches_the_reference(tmp_path, plugin):
    """A graph of one milora::RoutedLora node (as --target tensorrt writes it) built into an
    engine with the AOT kernel (and the JIT one), run on a mixed batch: equal to the reference
    on active rows and base_out bit for bit on the others."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from milora.export.lowering import keep_as_plugin
    from milora.plugins import profiles as pf
    from milora.plugins import trt_plugin
    from milora.plugins.build import _build_one

    B, T, d_in, d_out, R, S, L = 5, 3, 64, 48, 16, 4, 2
    vi = helper.make_tensor_value_info
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [vi("x", f, [B, T, d_in]), vi("base_out", f, [B, T, d_out]), vi("lora_A", f, [S, L, d_in, R]),
              vi("lora_B", f, [S, L, R, d_out]), vi("tenant_slots", i64, [B]), vi("layer_gates", f, [B, 7])]
    node = helper.make_node(rl.OP_TYPE, [v.name for v in inputs], ["y"], domain=rl.DOMAIN, layer=1, expert=3)
    graph = helper.make_graph([node], "one", inputs, [vi("y", f, [B, T, d_out])])
    model = keep_as_plugin(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid(rl.DOMAIN, 1)]))
    onnx.save(model, str(tmp_path / "one.onnx"))
    import tensorrt as trt

    trt_plugin.register()
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in inputs}
    profile = {n: (s, s, s) for n, s in shapes.items()}
    plan = {"strongly_typed": True, "flags": [], "clear_flags": ["TF32"]}
    data = _build_one(trt, trt.Logger(trt.Logger.WARNING), tmp_path / "one.onnx", profile, plan,
                      pf.BuildOptions(plugin=plugin), tmp_path / "timing.cache")
    g = torch.Generator().manual_seed(0)
    x, base = torch.randn(B, T, d_in, generator=g), torch.randn(B, T, d_out, generator=g)
    a, b = torch.randn(S, L, d_in, R, generator=g) / 8, torch.randn(S, L, R, d_out, generator=g)
    a[0], b[0] = 0, 0
    slots, gates = torch.tensor([1, 0, 2, 3, 1]), torch.rand(B, 7, generator=g) + 0.1
    gates[4, 3] = 0
    feeds = {"x": x, "base_out": base, "lora_A": a, "lora_B": b, "tenant_slots": slots, "layer_gates": gates}
    with TrtRunner(EngineFromBytes(data)) as runner:
        y = runner.infer({n: v.numpy() for n, v in feeds.items()})["y"]
    want = rl.routed_lora_reference(x, base, a, b, slots, gates, 1, 3).numpy()
    np.testing.assert_allclose(y[[0, 2, 3]], want[[0, 2, 3]], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(y[[1, 4]], base.numpy()[[1, 4]])
