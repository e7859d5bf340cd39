"""The bad-input matrix, TensorRT rows (docs/errors.md, "TensorRT engines and backend"):
milora-build-engines refuses what it cannot build before TensorRT is touched, the TensorRT
backend refuses engines and calls it cannot serve, and the routed LoRA kernel refuses inputs
that do not fit the op; each with a typed error naming the value seen, what was expected and
the fix."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from errors_helpers import edit_json, fails, raises
from milora.errors import CapacityError, ManifestError, RequestError
from milora.format import manifest as mf
from milora.plugins import build_cli
from milora.plugins import profiles as pf
from milora.plugins.profiles import Range
from plugins_helpers import stand_in_backend, tensorrt_export

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tensorrt_export(tmp_path_factory)[1]


def copy_with(export, tmp_path, change):
    """A copy of the export whose manifest.json was edited (the other files keep their hashes)."""
    other = tmp_path / "copy"
    shutil.copytree(export, other)
    edit_json(other / mf.MANIFEST_FILE, change)
    return other


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_build_engines_without_tensorrt(capsys, export, tmp_path):
    fails(capsys, build_cli.main, [export, tmp_path / "eng"], "TensorRT is not installed",
          "install it on a machine with an NVIDIA GPU", "pip install 'milora[tensorrt]'")
    assert not (tmp_path / "eng").exists()


def test_build_engines_int8_without_qdq(capsys, export, tmp_path):
    for precision in ("int8", "fp8"):
        fails(capsys, build_cli.main, [export, tmp_path / "eng", "--precision", precision],
              f"--precision {precision} needs a graph with QuantizeLinear/DequantizeLinear nodes",
              "this export's graphs have none", "Fix: quantize the graphs first")


def test_build_engines_precision_the_export_cannot_take(capsys, export, tmp_path):
    half = copy_with(export, tmp_path, lambda m: m.update(dtype="float16"))
    fails(capsys, build_cli.main, [half, tmp_path / "eng", "--precision", "fp32"],
          "--precision fp32 needs a float32 export; this one is float16", "Fix: export again with milora-export --dtype fp32")
    fails(capsys, build_cli.main, [half, tmp_path / "eng", "--precision", "bf16"],
          "--precision bf16 needs a float32 export", "Fix: export with --dtype fp32")


def test_build_engines_bad_profile_ranges(capsys, export, tmp_path):
    fails(capsys, build_cli.main, [export, tmp_path / "eng", "--batch", "1:4"], "--batch '1:4' is malformed",
          "expected MIN:OPT:MAX", "Fix: e.g. --batch 1:4:8")
    fails(capsys, build_cli.main, [export, tmp_path / "eng", "--past", "1:8:200"],
          "--past max 200 + --decode-tokens max 16 = 216 exceeds the model's context of 128 tokens",
          "Fix: lower --past MAX")
    fails(capsys, build_cli.main, [export, tmp_path / "eng", "--sequence", "4:2:8", "--print-trtexec"],
          "--sequence 4:2:8 is out of order or range", "expected 1 <= MIN <= OPT <= MAX")


def test_build_engines_from_an_onnxruntime_export(capsys, export, tmp_path):
    ort = copy_with(export, tmp_path, lambda m: m.update(target="onnxruntime", lora_lowering="if_compact"))
    fails(capsys, build_cli.main, [ort, tmp_path / "eng"], "was exported for onnxruntime",
          "Fix: export with milora-export --target tensorrt")


def test_tensorrt_backend_engines_of_another_export(export, tmp_path):
    from milora.plugins.build import read_engines

    eng = tmp_path / "eng"
    raises(ManifestError, lambda: read_engines(eng, export), "holds no engines.json",
           f"Fix: milora-build-engines {export} {eng}")
    eng.mkdir()
    (eng / pf.ENGINES_FILE).write_text(json.dumps({"format": pf.ENGINES_FORMAT, "graphs": {},
                                                   "source": {"manifest_sha256": "0" * 64}}))
    raises(ManifestError, lambda: read_engines(eng, export), "were built from another export than",
           "expected engines of this export", "Fix: milora-build-engines")


def test_tensorrt_backend_call_outside_the_profile(export):
    from milora.runtime import Engine

    limits = {"batch": Range(1, 2, 2), "sequence": Range(1, 4, 8), "decode_tokens": Range(1, 1, 2),
              "past": Range(1, 8, 16)}
    with Engine(export, backend=lambda bundle: stand_in_backend(bundle, limits)) as engine:
        backend = engine.backend
        raises(CapacityError, lambda: backend.prefill([list(range(3, 13))], [1]),
               "the TensorRT prefill engine cannot run 10 prompt tokens (the engines take 1:4:8)",
               "Fix: rebuild with milora-build-engines and a larger --sequence maximum")
        _, gates, kv = backend.prefill([[5, 6, 7]], [1])
        rows = backend.bind_rows(np.array([1]), gates)
        raises(CapacityError, lambda: backend.extend(np.array([[5, 6, 7]]), np.ones((1, 3)), kv, rows),
               "decode engine cannot run 3 new tokens (the engines take 1:1:2)", "--decode-tokens maximum")


def test_routed_lora_kernel_bad_inputs():
    torch = pytest.importorskip("torch")
    from milora.plugins import torch_ops

    x, base = torch.zeros(2, 3, 8), torch.zeros(2, 3, 6)
    a, b = torch.zeros(4, 2, 8, 5), torch.zeros(4, 2, 5, 6)
    slots, gates = torch.zeros(2, dtype=torch.int64), torch.zeros(2, 7)
    raises(RequestError, lambda: torch_ops.routed_lora(x, base, a, b[..., :5], slots, gates, 0, 0),
           "RoutedLora inputs disagree: base_out d_out is 6, expected 5", "Fix: feed x [B,T,d_in]")
    raises(RequestError, lambda: torch_ops.routed_lora(x, base.half(), a, b, slots, gates, 0, 0),
           "must share one dtype", "'base_out': torch.float16")
    raises(RequestError, lambda: torch_ops.routed_lora(x, base, a, b, slots, gates, 2, 0),
           "layer=2, expert=0 are out of range; expected layer in 0..1")
