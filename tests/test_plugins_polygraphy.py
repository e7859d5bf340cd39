"""The Polygraphy data-loader scripts milora-export writes (OUT_DIR/polygraphy/<graph>_data.py):
listed in the manifest like every file, feeding real prompts, tenant slots, the packs' banks and
(decode) the gates and KV of a real prefill; and `polygraphy run --onnxrt` driven with them on
the tiny export (docs/tensorrt.md; --trt runs where TensorRT exists)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import pytest

from milora.format import manifest as mf
from milora.plugins.polygraphy_scripts import GRAPHS, loader_file
from plugins_helpers import ROOT, python_env, tensorrt_export

pytest.importorskip("polygraphy", reason="polygraphy is not installed: pip install polygraphy==0.53.6 (milora[dev])")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tensorrt_export(tmp_path_factory)[1]


def load_script(path):
    spec = importlib.util.spec_from_file_location(f"loader_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def polygraphy(*args, timeout=300):
    exe = shutil.which("polygraphy", path=str(__import__("pathlib").Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-c", "from polygraphy.tools._main import main; main()"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=python_env(False), cwd=ROOT,
                          timeout=timeout)


def test_the_scripts_are_in_the_manifests_file_hashes(export):
    m = mf.read_manifest(export)
    for graph in GRAPHS:
        assert (export / loader_file(graph)).is_file()
        assert m["files"][loader_file(graph)] == mf.sha256_file(export / loader_file(graph))
    mf.verify_files(export, m)


def test_prefill_feeds_real_prompts_slots_and_the_packs_banks(export):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    m = mf.read_manifest(export)
    loader = load_script(export / loader_file("prefill"))
    batch, single = loader.feeds()
    assert set(batch) == {i["name"] for i in m["graphs"]["prefill"]["inputs"]}
    tenants = sorted(m["tenants"], key=lambda t: m["tenants"][t]["slot"])
    assert batch[mf.TENANT_SLOTS].tolist() == [m["tenants"][t]["slot"] for t in tenants] + [0]
    tok = Tokenizer.from_file(str(export / "tokenizer.json"))
    want = tok.encode(loader.TEXTS[0], add_special_tokens=False).ids[:loader.MAX_TOKENS]
    row = batch[mf.INPUT_IDS][0][batch[mf.ATTENTION_MASK][0] == 1]
    assert row.tolist() == want
    assert (batch[mf.ATTENTION_MASK].sum(1) >= 1).all() and (np.diff(batch[mf.ATTENTION_MASK], axis=1) >= 0).all()
    for t in tenants:
        pack = load_file(str(export / m["tenants"][t]["pack"]))
        for name in (mf.lora_a_bank("q_proj"), mf.ROUTER_WEIGHT, mf.SLOT_OPTIONS):
            np.testing.assert_array_equal(batch[name][m["tenants"][t]["slot"]], pack[name])
    assert not batch[mf.lora_b_bank("up_proj")][0].any(), "slot 0 is the base model"
    assert single[mf.INPUT_IDS].shape[0] == 1


def test_decode_feeds_the_routing_and_kv_of_a_real_prefill(export):
    import onnxruntime as ort

    m = mf.read_manifest(export)
    pre = load_script(export / loader_file("prefill")).feeds()[0]
    dec = load_script(export / loader_file("decode")).feeds()[0]
    assert list(dec) == [i["name"] for i in m["graphs"]["decode"]["inputs"]]
    sess = ort.InferenceSession(str(export / m["graphs"]["prefill"]["file"]))
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, pre)))
    np.testing.assert_array_equal(dec[mf.GATES], out[mf.GATES])
    np.testing.assert_array_equal(dec[mf.past_key(1)], out[mf.present_key(1)])
    assert dec[mf.INPUT_IDS][:, 0].tolist() == out[mf.LOGITS][:, -1].argmax(-1).tolist()
    assert dec[mf.ATTENTION_MASK].shape[1] == pre[mf.ATTENTION_MASK].shape[1] + 1
    routed = dec[mf.TENANT_SLOTS] != 0
    assert (dec[mf.GATES][routed] != 0).any() and not dec[mf.GATES][~routed].any()


@pytest.mark.parametrize("graph", GRAPHS)
def test_polygraphy_runs_onnxruntime_on_the_loader(export, tmp_path, graph):
    script = export / loader_file(graph)
    saved = tmp_path / "ort.json"
    proc = polygraphy("run", export / f"{graph}.onnx", "--onnxrt", "--data-loader-script", script,
                      "--save-outputs", saved, "--save-inputs", tmp_path / "inputs.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    results = RunResults.load(str(saved))
    (_, iterations), = results.items()
    assert len(iterations) == 2  # the mixed batch and the single row
    inputs = load_json(str(tmp_path / "inputs.json"))
    feeds = load_script(script).feeds()
    np.testing.assert_array_equal(inputs[0][mf.TENANT_SLOTS], feeds[0][mf.TENANT_SLOTS])
    assert np.isfinite(iterations[0][mf.LOGITS]).all()
    # The comparison step of the documented flow (an engine's outputs against onnxruntime's):
    again = polygraphy("run", export / f"{graph}.onnx", "--onnxrt", "--data-loader-script", script,
                       "--load-outputs", saved)
    assert again.returncode == 0 and "PASSED" in again.stdout + again.stderr, again.stdout[-2000:]


def test_polygraphy_marks_every_output_for_debugging(export, tmp_path):
    proc = polygraphy("run", export / "decode.onnx", "--onnxrt", "--onnx-outputs", "mark", "all",
                      "--data-loader-script", export / loader_file("decode"), "--save-outputs", tmp_path / "all.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from polygraphy.comparator import RunResults

    (_, iterations), = RunResults.load(str(tmp_path / "all.json")).items()
    names = set(iterations[0].keys())
    assert mf.LOGITS in names and any("RoutedLora" in n or "/lora/" in n for n in names), sorted(names)[:20]


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (it needs an NVIDIA GPU; pip install "
                    "'milora[tensorrt]' milora[kernels]): this compares --onnxrt and --trt with the loaders")
@pytest.mark.parametrize("graph", GRAPHS)
def test_polygraphy_compares_onnxruntime_and_tensorrt(export, graph):
    script = export / loader_file(graph)
    proc = polygraphy("run", export / f"{graph}.onnx", "--onnxrt", "--trt", "--data-loader-script", script,
                      "--trt-config-script", f"{script}:trt_config", "--atol", "1e-4", "--rtol", "1e-3", timeout=900)
    assert proc.returncode == 0 and "PASSED" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_reduce_preparation_and_the_plugin_registering_wrapper(export, tmp_path):
    """The documented `debug reduce` flow up to its check command, on CPU: save inputs and every
    tensor, merge them, and run the wrapper (polygraphy with the plugin registered) on them."""
    script = export / loader_file("decode")
    proc = polygraphy("run", export / "decode.onnx", "--onnxrt", "--data-loader-script", script,
                      "--save-inputs", tmp_path / "inputs.json", "--onnx-outputs", "mark", "all",
                      "--save-outputs", tmp_path / "layerwise.json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    merged = polygraphy("data", "merge", tmp_path / "inputs.json", tmp_path / "layerwise.json",
                        "-o", tmp_path / "layerwise_inputs.json")
    assert merged.returncode == 0, merged.stdout[-2000:] + merged.stderr[-2000:]
    wrapped = subprocess.run([sys.executable, "-m", "milora.plugins.polygraphy_cli", "run", str(export / "decode.onnx"),
                              "--onnxrt", "--load-inputs", str(tmp_path / "layerwise_inputs.json")],
                             capture_output=True, text=True, env=python_env(False), cwd=ROOT, timeout=300)
    assert wrapped.returncode == 0 and "PASSED" in wrapped.stdout + wrapped.stderr, wrapped.stderr[-2000:]
