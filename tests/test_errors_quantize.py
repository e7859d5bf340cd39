"""Bad-input matrix, "Quantization" (docs/errors.md): milora-quantize refuses what it cannot
quantize, bad options and unusable calibration data with one line (exit 2) before writing
anything, and refuses an export whose routing agreement is below the threshold, numbers given."""

from __future__ import annotations

import json
import shutil

from errors_helpers import fails, nothing_written
from milora.calibration import cli as quantize_cli
from milora.calibration.quantize import quantize

FAST = ["--report-prompts", "3", "--report-steps", "1", "--calib-samples", "4", "--quiet"]


def _edited_copy(out_dir, tmp_path, **changes):
    copy = tmp_path / "src"
    shutil.copytree(out_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m.update(changes)
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy


def test_quantize_a_source_it_cannot_start_from(capsys, tiny_export, tmp_path):
    _, out_dir = tiny_export
    fails(capsys, quantize_cli.main, [tmp_path / "nope", tmp_path / "q", "--precision", "int4"],
          "is not a directory", "expected an export of milora-export", "Fix:")
    fp16 = _edited_copy(out_dir, tmp_path, dtype="float16")
    fails(capsys, quantize_cli.main, [fp16, tmp_path / "q", "--precision", "int4"],
          "is a float16 export; expected float32", "Fix: export again with --dtype fp32")
    shutil.rmtree(fp16)
    done = _edited_copy(out_dir, tmp_path, quantization={"precision": "int4", "options": {}})
    fails(capsys, quantize_cli.main, [done, tmp_path / "q", "--precision", "int8-dynamic"],
          "is already quantized (int4)", "Fix: quantize the float32 export it came from")
    assert nothing_written(tmp_path, "q")


def test_quantize_bad_options(capsys, tiny_export, tmp_path):
    _, out_dir = tiny_export
    q = tmp_path / "q"
    fails(capsys, quantize_cli.main, [out_dir, q, "--precision", "int4", "--block-size", "48"],
          "--block-size 48", "expected a power of two from 16 to 256")
    fails(capsys, quantize_cli.main, [out_dir, q, "--precision", "int4", "--accuracy-level", "7"],
          "--accuracy-level 7", "expected 0 (unset)")
    fails(capsys, quantize_cli.main, [out_dir, q, "--precision", "fp8"],
          "--precision fp8 writes Q/DQ graphs for TensorRT", "add --target tensorrt")
    fails(capsys, quantize_cli.main, [out_dir, q, "--precision", "int4", "--target", "tensorrt"],
          "--target tensorrt takes explicit quantization (Q/DQ) graphs", "Fix:")
    fails(capsys, quantize_cli.main, [out_dir, q, "--precision", "int4", "--threshold", "1.5"],
          "--threshold 1.5", "expected a share between 0 and 1")
    fails(capsys, quantize_cli.main, [out_dir, q, "--precision", "int4", "--eval-task", "alpha"],
          "--eval-task 'alpha' is malformed; expected TENANT=TASK")
    fails(capsys, quantize_cli.main, [out_dir, q, "--precision", "int4", "--eval-task", "alpha=chess"],
          "unknown task", "arc_e")
    fails(capsys, quantize_cli.main, [out_dir, q, "--precision", "int3"], "--precision", "invalid choice")
    assert nothing_written(tmp_path, "q")


def test_quantize_into_a_used_directory(capsys, tiny_export, tmp_path):
    _, out_dir = tiny_export
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    fails(capsys, quantize_cli.main, [out_dir, tmp_path / "q", "--precision", "int4"],
          "QUANT_DIR", "is not empty", "--force")
    assert (tmp_path / "q" / "keep.txt").read_text() == "mine"
    fails(capsys, quantize_cli.main, [out_dir, out_dir, "--precision", "int4"], "is OUT_DIR", "Fix:")


def test_quantize_bad_calibration_data(capsys, tiny_export, tmp_path):
    _, out_dir = tiny_export
    q = tmp_path / "q"
    args = [out_dir, q, "--precision", "int8-static", *FAST, "--calibration"]
    fails(capsys, quantize_cli.main, [*args, tmp_path / "missing.jsonl"], "missing.jsonl does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w5 w6"}\n{"prompt": \n')
    fails(capsys, quantize_cli.main, [*args, bad], "bad.jsonl:2 is not JSON", "Fix: correct that line")
    bad.write_text('{"prompt": "w5 w6"}\n{"tenant": "alpha"}\n')
    fails(capsys, quantize_cli.main, [*args, bad], "bad.jsonl:2 has no prompt")
    bad.write_text('{"prompt": "w5 w6", "tenant": "zeta"}\n')
    fails(capsys, quantize_cli.main, [*args, bad], "names tenant 'zeta', which the export lacks")
    bad.write_text('{"prompt": "w5 w6", "tenant": "alpha"}\n')
    fails(capsys, quantize_cli.main, [*args, bad], "gives no prompt to tenant(s) beta")
    fails(capsys, quantize_cli.main, [*args, "chess"], "neither a file nor a built-in task")
    assert nothing_written(tmp_path, "q")


def test_quantize_tensorrt_from_fused_graphs(capsys, tiny_fused_export, tmp_path):
    _, out_dir = tiny_fused_export
    fails(capsys, quantize_cli.main, [out_dir, tmp_path / "q", "--precision", "int8-static", "--target", "tensorrt"],
          "holds fused graphs", "Fix: export with --flavour portable")
    assert nothing_written(tmp_path, "q")


def test_quantize_routing_agreement_below_threshold(capsys, tiny_export, tmp_path):
    """int4 on the tiny random model flips some routing choices (its router margins are small):
    at --threshold 1.0 it is refused with the numbers; --force-agreement writes it."""
    _, out_dir = tiny_export
    line = fails(capsys, quantize_cli.main, [out_dir, tmp_path / "q", "--precision", "int4", "--threshold", "1.0",
                                             "--report-prompts", "12", "--report-steps", "1", "--quiet"],
                 "routing agreement with the float32 source is below the "
                 "threshold 1.0", "(prompt, layer) selections identical", "nothing was written", "--force-agreement")
    assert "next-token agreement" in line and "KL" in line
    assert nothing_written(tmp_path, "q")
    m = quantize(out_dir, tmp_path / "q", precision="int4", threshold=1.0, force_agreement=True, report_prompts=12,
                 report_steps=1, progress=False)
    assert m["quantization"]["agreement"]["forced"] and m["quantization"]["agreement"]["below_threshold"]


def test_quantize_keep_float_that_selects_nothing(capsys, tiny_export, tmp_path):
    _, out_dir = tiny_export
    q = tmp_path / "q"
    args = [out_dir, q, "--precision", "int4", *FAST]
    fails(capsys, quantize_cli.main, [*args, "--keep-float", "layers.7"],
          "--keep-float 'layers.7' matches no weight MatMul of this export", "layers.0-1.{q_proj,",
          "Fix: pick from those")
    fails(capsys, quantize_cli.main, [*args, "--keep-float", "down_proj", "self.attn"],
          "--keep-float 'self.attn': 'self' is neither layers.RANGE nor a module", "e.g. layers.0-3.down_proj")
    fails(capsys, quantize_cli.main, [*args, "--keep-float", "layers.3-1"], "layer range '3-1' is malformed")
    fails(capsys, quantize_cli.main, [*args, "--keep-float", "mlp.q_proj"], "'mlp.q_proj' matches no weight MatMul")
    fails(capsys, quantize_cli.main, [*args, "--auto-keep", "--no-report"], "--auto-keep", "Fix: drop --no-report")
    fails(capsys, quantize_cli.main, [out_dir, q, "--precision", "fp16", "--auto-keep", *FAST],
          "--auto-keep with --precision fp16", "Fix:")
    assert nothing_written(tmp_path, "q")
