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
                               "'milora[tensorrt]'): this test registers milora::RoutedLora with tensorrt.plugin, "
                               "builds a one-node engine and compares it with the PyTorch reference")
GOOD_TYPES = ["HALF", "HALF", "HALF", "HALF", "INT64", "FLOAT"]
RANKS = [3, 3, 4, 4, 1, 2]


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
