"""milora-build-engines without TensorRT: optimization profiles from the manifest, the precision
plan, the graph handed to TensorRT's parser, trtexec equivalents and the command line; the
builds themselves are marked tensorrt."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from milora.errors import EngineBuildError, ManifestError, UsageError
from milora.format import manifest as mf
from milora.export import routed_lora as rl
from milora.plugins import profiles as pf
from plugins_helpers import ROOT, python_env, tensorrt_export

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NEEDS_TRT = pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (it needs an NVIDIA GPU; pip install "
                               "'milora[tensorrt]' milora[kernels]): this builds the tiny export's engines")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tensorrt_export(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def manifest(export):
    return mf.read_manifest(export)


def run_cli(*args):
    """The command in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "milora.plugins.build_cli", *map(str, args)], capture_output=True,
                          text=True, env=python_env(interpret=False), cwd=ROOT, timeout=300)


def run_main(capsys, *args):
    """The command's main() in this process: (exit status, stderr)."""
    from milora.plugins.build_cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_default_ranges_fit_the_context(manifest):
    r = pf.ranges(manifest, pf.BuildOptions())
    ctx = manifest["base"]["max_position_embeddings"]  # 128 for the tiny model
    assert (r["batch"].min, r["batch"].opt, r["batch"].max) == (1, 4, 8)
    assert r["sequence"].max == ctx and r["decode_tokens"] == pf.Range(1, 1, 16)
    assert r["past"].max + r["decode_tokens"].max == ctx


def test_profiles_cover_every_graph_input_with_the_manifests_axes(manifest):
    opts = pf.BuildOptions(batch=pf.Range(1, 2, 4), sequence=pf.Range(1, 8, 64), decode_tokens=pf.Range(1, 1, 4),
                           past=pf.Range(1, 16, 100))
    prof = pf.profiles(manifest, opts)
    S, L, hkv, hd = manifest["slots"], manifest["base"]["num_layers"], manifest["base"]["num_kv_heads"], \
        manifest["base"]["head_dim"]
    for graph in pf.GRAPHS:
        assert set(prof[graph]) == {i["name"] for i in manifest["graphs"][graph]["inputs"]}
        for name, (lo, opt, hi) in prof[graph].items():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
    pre, dec = prof["prefill"], prof["decode"]
    assert pre[mf.INPUT_IDS] == ((1, 1), (2, 8), (4, 64))
    assert dec[mf.INPUT_IDS] == ((1, 1), (2, 1), (4, 4))
    assert dec[mf.ATTENTION_MASK] == ((1, 2), (2, 17), (4, 104))  # past + new tokens
    assert dec[mf.past_key(0)] == ((1, hkv, 1, hd), (2, hkv, 16, hd), (4, hkv, 100, hd))
    assert dec[mf.GATES] == ((1, L, 7), (2, L, 7), (4, L, 7))
    bank = mf.lora_a_bank("q_proj")
    assert dec[bank][0] == dec[bank][2] == (S, *manifest["banks"][bank]["shape"]), "the banks' slots are fixed"


@pytest.mark.parametrize("field, value, message", [
    ("batch", pf.Range(2, 1, 4), r"--batch 2:1:4 is out of order or range; expected 1 <= MIN <= OPT <= MAX"),
    ("past", pf.Range(0, 1, 4), r"--past 0:1:4 is out of order"),
    ("sequence", pf.Range(1, 8, 500), r"--sequence max 500 exceeds the model's context of 128 tokens"),
    ("past", pf.Range(1, 8, 120), r"--past max 120 \+ --decode-tokens max 16 = 136 exceeds the model's context"),
])
def test_ranges_outside_the_model_are_refused(manifest, field, value, message):
    with pytest.raises(UsageError, match=message):
        pf.ranges(manifest, pf.BuildOptions(**{field: value}))


@pytest.mark.parametrize("text, expected", [("1:4:8", pf.Range(1, 4, 8)), ("16", pf.Range(16, 16, 16))])
def test_range_syntax(text, expected):
    assert pf.Range.parse(text, "--batch") == expected


@pytest.mark.parametrize("text", ["1:4", "a:b:c", "1:-2:3", ""])
def test_range_syntax_errors(text):
    with pytest.raises(UsageError, match=r"--batch .* is malformed; expected MIN:OPT:MAX"):
        pf.Range.parse(text, "--batch")


@pytest.mark.parametrize("precision, dtype, plan", [
    ("auto", "float32", {"strongly_typed": True, "flags": [], "clear_flags": []}),
    ("auto", "float16", {"strongly_typed": True, "flags": [], "clear_flags": []}),
    ("fp32", "float32", {"strongly_typed": True, "flags": [], "clear_flags": ["TF32"]}),
    ("fp16", "float32", {"strongly_typed": False, "flags": ["FP16"], "clear_flags": []}),
    ("bf16", "float32", {"strongly_typed": False, "flags": ["BF16"], "clear_flags": []}),
    ("fp16", "float16", {"strongly_typed": True, "flags": [], "clear_flags": []}),
])
def test_precision_plans(precision, dtype, plan):
    assert pf.precision_plan(precision, {"dtype": dtype}, qdq=False) == plan


@pytest.mark.parametrize("precision, dtype, message", [
    ("int8", "float32", r"--precision int8 needs a graph with QuantizeLinear/DequantizeLinear nodes"),
    ("fp8", "float16", r"--precision fp8 needs a graph with QuantizeLinear/DequantizeLinear nodes"),
    ("fp32", "float16", r"--precision fp32 needs a float32 export; this one is float16"),
    ("bf16", "float16", r"--precision bf16 needs a float32 export"),
])
def test_precisions_a_graph_cannot_take_are_refused(precision, dtype, message):
    with pytest.raises(EngineBuildError, match=message):
        pf.precision_plan(precision, {"dtype": dtype}, qdq=False)


def test_quantized_graphs_take_int8_and_fp8(export, manifest, tmp_path):
    import onnx
    from onnx import helper

    path = export / manifest["graphs"]["decode"]["file"]
    assert not pf.has_qdq(path)
    g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
                           helper.make_node("DequantizeLinear", ["q", "s"], ["y"])], "qdq", [], [])
    onnx.save(helper.make_model(g), str(tmp_path / "qdq.onnx"))
    assert pf.has_qdq(tmp_path / "qdq.onnx")
    for precision in ("int8", "fp8"):
        assert pf.precision_plan(precision, manifest, qdq=True)["strongly_typed"]


def test_parser_graph_marks_plugin_nodes_aot_and_leaves_the_file(export, manifest):
    import onnx
    from onnx import helper

    path = export / manifest["graphs"]["decode"]["file"]
    before = mf.sha256_file(path)
    model = onnx.load_from_string(pf.parser_graph(path, "aot"))
    nodes = [n for n in model.graph.node if n.op_type == rl.OP_TYPE]
    assert len(nodes) == 7 * manifest["base"]["num_layers"]
    for n in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs[pf.AOT_ATTRIBUTE] == 1 and attrs["plugin_namespace"] == rl.PLUGIN_NAMESPACE.encode()
    jit = onnx.load_from_string(pf.parser_graph(path, "jit"))
    assert not any(a.name == pf.AOT_ATTRIBUTE for n in jit.graph.node for a in n.attribute)
    assert mf.sha256_file(path) == before
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer), \
        "weights stay in weights.onnx.data, found by the parser through the graph's path"


def test_parser_graph_refuses_a_graph_without_plugin_nodes(tmp_path):
    import onnx
    from onnx import helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain", [], [])
    onnx.save(helper.make_model(g), str(tmp_path / "plain.onnx"))
    with pytest.raises(EngineBuildError, match=r"has no milora::RoutedLora nodes.*--target tensorrt"):
        pf.parser_graph(tmp_path / "plain.onnx", "aot")


def test_trtexec_equivalents(export, manifest, tmp_path):
    opts = pf.BuildOptions(precision="fp16", workspace_mib=1024, optimization_level=4)
    lines = pf.trtexec_commands(export, tmp_path / "eng", manifest, opts)
    builds = [line for line in lines if line.startswith("trtexec --onnx=")]
    runs = [line for line in lines if line.startswith("trtexec --loadEngine=")]
    assert len(builds) == len(runs) == 2
    for line in builds:
        for part in ("--minShapes=input_ids:1x1,", "--optShapes=", "--maxShapes=", "--fp16",
                     "--memPoolSize=workspace:1024M", "--timingCacheFile=", "--builderOptimizationLevel=4"):
            assert part in line, (part, line)
    assert "past_key_values.0.key:4x2x512x8" not in builds[1]  # the tiny context caps past
    assert "--shapes=input_ids:4x1,attention_mask:4x" in runs[1] and runs[1].endswith("--noDataTransfers")
    strict = pf.trtexec_commands(export, tmp_path / "eng", manifest, pf.BuildOptions())
    assert all("--stronglyTyped" in line for line in strict if line.startswith("trtexec --onnx="))


def test_cli_prints_trtexec_without_tensorrt(export, tmp_path):
    proc = run_cli(export, tmp_path / "eng", "--print-trtexec", "--batch", "1:2:4", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert "--noTF32" in proc.stdout and "--maxShapes=input_ids:4x" in proc.stdout
    assert not (tmp_path / "eng").exists()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_cli_without_tensorrt_says_what_to_install(export, tmp_path, capsys):
    code, err = run_main(capsys, export, tmp_path / "eng")
    assert code == 2
    assert err.startswith("milora-build-engines: error: TensorRT is not installed") and \
        "pip install 'milora[tensorrt]'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--batch", "8:4:1"], "--batch 8:4:1 is out of order"),
    (["--precision", "int8"], "needs a graph with QuantizeLinear/DequantizeLinear nodes"),
    (["--workspace", "0"], "--workspace 0 is out of range"),
    (["--optimization-level", "9"], "--optimization-level 9 is out of range; expected 0..5"),
    (["--precision", "int4"], "argument --precision: invalid choice: 'int4'"),
])
def test_cli_refuses_bad_options_before_tensorrt(export, tmp_path, capsys, args, message):
    code, err = run_main(capsys, export, tmp_path / "eng", *args)
    assert code == 2 and message in err, err


def test_an_onnxruntime_export_is_refused(export, tmp_path):
    from milora.plugins.build import build_engines

    other = tmp_path / "ort"
    shutil.copytree(export, other)
    m = json.loads((other / mf.MANIFEST_FILE).read_text())
    m["target"], m["lora_lowering"] = "onnxruntime", "if_compact"
    (other / mf.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(EngineBuildError, match=r"exported for onnxruntime.*--target tensorrt"):
        build_engines(other, tmp_path / "eng")


def test_read_engines_checks_the_source_export(export, tmp_path):
    from milora.plugins.build import read_engines

    eng = tmp_path / "eng"
    with pytest.raises(ManifestError, match=r"holds no engines.json.*milora-build-engines"):
        read_engines(eng, export)
    eng.mkdir()
    doc = {"format": pf.ENGINES_FORMAT, "graphs": {g: {"file": pf.engine_file(g)} for g in pf.GRAPHS},
           "source": {"manifest_sha256": "0" * 64}}
    (eng / pf.ENGINES_FILE).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="built from another export"):
        read_engines(eng, export)
    doc["source"]["manifest_sha256"] = mf.sha256_file(export / mf.MANIFEST_FILE)
    (eng / pf.ENGINES_FILE).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="has no prefill engine"):
        read_engines(eng, export)
    for g in pf.GRAPHS:
        (eng / pf.engine_file(g)).write_bytes(b"x")
    assert read_engines(eng, export)["graphs"]["decode"]["file"] == "decode.engine"


@pytest.mark.tensorrt
@NEEDS_TRT
def test_build_engines_of_the_tiny_export(export, tmp_path):
    """On a GPU with TensorRT: both engines build with the AOT plugin, engines.json records the
    profiles, and a second build reuses the timing cache."""
    from milora.plugins.build import build_engines, read_engines

    opts = pf.BuildOptions(batch=pf.Range(1, 2, 4), sequence=pf.Range(1, 8, 32), past=pf.Range(1, 16, 64))
    doc = build_engines(export, tmp_path / "eng", opts)
    assert set(doc["graphs"]) == set(pf.GRAPHS) and (tmp_path / "eng" / pf.TIMING_CACHE).is_file()
    assert read_engines(tmp_path / "eng", export)["precision"] == "auto"
