"""milora-quantize: thin argument parsing over milora.calibration.quantize (docs/quantization.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from milora.calibration.quantize import CALIB_METHODS, PRECISIONS, QUANT_TARGETS, QuantizeOptions
from milora.cli_errors import ArgumentParser, cli_main


def parser() -> ArgumentParser:
    d = QuantizeOptions()  # the defaults are the API's own
    p = ArgumentParser(
        prog="milora-quantize",
        description="Quantize a float32 export of milora-export into a complete export directory the runtime serves "
                    "unchanged; routers and adapter banks stay float32. An agreement report against the float32 "
                    "source is written with it, and an export whose routing agreement is below --threshold is refused.")
    p.add_argument("out_dir", type=Path, help="a float32 export of milora-export (read only)")
    p.add_argument("quant_dir", type=Path, help="where the quantized export goes (must be empty unless --force)")
    p.add_argument("--precision", required=True, choices=PRECISIONS,
                   help="fp16; int8-dynamic (weights int8, activations per call); int8-static (Q/DQ, calibrated); "
                        "int8-weight (weight-only 8-bit MatMulNBits, embedding float32); int4 (weight-only "
                        "MatMulNBits); fp8 (Q/DQ for TensorRT)")
    p.add_argument("--target", default=d.target, choices=QUANT_TARGETS,
                   help="onnxruntime (default) or tensorrt: explicit-quantization Q/DQ graphs for TensorRT "
                        "(int8-static, fp8; engines are built on a GPU machine)")
    p.add_argument("--block-size", type=int, default=d.block_size, help=f"int4 / int8-weight block size (default {d.block_size})")
    p.add_argument("--accuracy-level", type=int, default=d.accuracy_level,
                   help=f"int4 / int8-weight MatMulNBits accuracy level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute "
                        f"(default {d.accuracy_level}, the fastest on CPU)")
    p.add_argument("--asymmetric", dest="symmetric", action="store_false", help="int4 / int8-weight: asymmetric blocks (zero points)")
    p.add_argument("--per-tensor", dest="per_channel", action="store_false", help="int8: one scale per weight tensor")
    p.add_argument("--reduce-range", action="store_true", help="int8-dynamic: 7-bit weights (x86 without VNNI)")
    p.add_argument("--no-embedding", dest="embedding", action="store_false", help="keep the embedding float32")
    p.add_argument("--no-lm-head", dest="lm_head", action="store_false", help="keep the LM head float32")
    p.add_argument("--keep-float", action="extend", nargs="+", default=[], metavar="SELECTOR",
                   help="keep these weight MatMuls float32 (mixed precision): down_proj, layers.0-3, "
                        "layers.0-9.mlp, lm_head, ... (docs/quantization.md)")
    p.add_argument("--auto-keep", action="store_true",
                   help="search for the fewest leading weight MatMuls to keep float32 so that every tenant's "
                        "routing agreement reaches --threshold (on prompts held out from the report)")
    p.add_argument("--calibration", default=None, metavar="FILE.jsonl|TASK",
                   help="prompts for calibration and the report: a JSONL file or a built-in task (default: random "
                        "token prompts, for tests only)")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples,
                   help=f"int8-static / fp8: calibration prompts over all tenants (default {d.calib_samples})")
    p.add_argument("--calib-method", default=d.calib_method, choices=CALIB_METHODS)
    p.add_argument("--percentile", type=float, default=d.percentile, help="with --calib-method percentile")
    p.add_argument("--report-prompts", type=int, default=d.report_prompts,
                   help=f"agreement report: prompts per tenant (default {d.report_prompts})")
    p.add_argument("--report-steps", type=int, default=d.report_steps,
                   help=f"agreement report: decode steps per prompt (default {d.report_steps})")
    p.add_argument("--eval-task", action="append", default=[], metavar="TENANT=TASK",
                   help="agreement report: score TENANT on a built-in task's test split, source and quantized")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"refuse when a tenant's routing agreement is below this (default {d.threshold})")
    p.add_argument("--force-agreement", action="store_true", help="write the export even below --threshold")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the agreement report (and the refusal)")
    p.add_argument("--force", action="store_true", help="replace a non-empty QUANT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_main("milora-quantize")
def main(argv: list[str] | None = None) -> int:
    from milora.calibration.quantize import parse_eval_tasks, quantize

    args = parser().parse_args(argv)
    opts = QuantizeOptions(precision=args.precision, target=args.target, block_size=args.block_size,
                           accuracy_level=args.accuracy_level, symmetric=args.symmetric, per_channel=args.per_channel,
                           reduce_range=args.reduce_range, embedding=args.embedding, lm_head=args.lm_head,
                           keep_float=args.keep_float, auto_keep=args.auto_keep,
                           calib_method=args.calib_method, percentile=args.percentile, calibration=args.calibration,
                           calib_samples=args.calib_samples, report=args.report, report_prompts=args.report_prompts,
                           report_steps=args.report_steps, threshold=args.threshold,
                           force_agreement=args.force_agreement, eval_tasks=parse_eval_tasks(args.eval_task),
                           eval_samples=args.eval_samples, force=args.force, progress=not args.quiet)
    manifest = quantize(args.out_dir, args.quant_dir, opts)
    q = manifest["quantization"]
    print(json.dumps({"quant_dir": str(args.quant_dir), "precision": q["precision"],
                      "weights_bytes": q["weights_bytes"], "source_weights_bytes": q["source"]["weights_bytes"],
                      "agreement": q.get("agreement")}, indent=2))
    if not opts.calibration and opts.precision in ("int8-static", "fp8"):
        print("milora-quantize: note: calibrated on random token prompts; pass --calibration FILE.jsonl or a task "
              "for a real deployment", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
