"""milora-export: thin argument parsing over milora.export.exporter (docs/export.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from milora.cli_errors import ArgumentParser, cli_main
from milora.errors import UsageError
from milora.export.exporter import TARGETS, ExportOptions
from milora.export.lowering import DEFAULT_LOWERING, LOWERINGS
from milora.format import manifest as mf


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="milora-export",
        description="Export a base model and its MiLoRA / PEFT / reference-code adapters to prefill + decode "
                    "ONNX graphs with multi-tenant adapter banks, validated against PyTorch.")
    p.add_argument("model_dir", nargs="?", type=Path, help="Hugging Face model directory (adapters at its root "
                   "and/or in adapters/<tenant>/)")
    p.add_argument("out_dir", nargs="?", type=Path, help="output directory (must be empty unless --force)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="add tenant NAME from adapter DIR (MiLoRA, PEFT LoRA or reference-code checkpoint)")
    d = ExportOptions()  # the defaults are the API's own, never retyped here
    p.add_argument("--dtype", default={"float32": "fp32", "float16": "fp16"}[d.dtype], choices=["fp32", "fp16"],
                   help="graph dtype (routers stay fp32)")
    p.add_argument("--opset", type=int, default=d.opset, help=f"(default {d.opset})")
    p.add_argument("--slots", type=int, default=None, help="adapter slots incl. slot 0 (default: tenants + 1)")
    p.add_argument("--lora-lowering", default=DEFAULT_LOWERING, choices=LOWERINGS,
                   help=f"routed-LoRA lowering for onnxruntime (default {DEFAULT_LOWERING}, chosen by measurement)")
    p.add_argument("--target", default=d.target, choices=list(TARGETS))
    p.add_argument("--flavour", default=d.flavour, choices=["auto", *mf.FLAVOURS],
                   help=f"graph flavour (default {d.flavour}: fused where it applies, i.e. onnxruntime target, fp32, "
                        "head dim a multiple of 16, last-position prefill logits; else portable). fused: "
                        "onnxruntime's GroupQueryAttention with KV written in place, fused norms and projections; "
                        "portable: standard ONNX operators only (TensorRT and other runtimes)")
    p.add_argument("--prefill-logits", default=d.prefill_logits, choices=list(mf.LOGITS_POSITIONS),
                   help="prefill logits for the last position only [B,1,V] (default: what serving needs) or "
                        "for every prompt position [B,T,V] (scoring prompts)")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="skip validation against PyTorch")
    p.add_argument("--python-op", action="store_true",
                   help="validate a --target tensorrt graph with the Python RoutedLora (fp32) instead of its "
                        "function body")
    p.add_argument("--decode-steps", type=int, default=d.decode_steps,
                   help=f"decode steps checked by the validation (default {d.decode_steps})")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads for tracing and the reference (default: torch's; 1 is much "
                        "faster on an oversubscribed machine)")
    p.add_argument("--check", type=Path, metavar="OUT_DIR", help="verify an exported directory (sha256 of every "
                   "file) and re-validate it against PyTorch when its sources still exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _adapters(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, d = item.partition("=")
        if not sep or not name or not d:
            raise UsageError(f"--adapter {item!r} is malformed; expected NAME=DIR. Fix: e.g. --adapter acme=./acme")
        if name in out:
            raise UsageError(f"--adapter {name}=... is given twice ({out[name]} and {d}); expected each tenant name "
                             "once. Fix: give the second adapter another name")
        out[name] = Path(d)
    return out


@cli_main("milora-export")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from milora.export.exporter import ExportOptions, check, export

    if args.check is not None:
        extra = [f for f, given in (("MODEL_DIR", args.model_dir), ("OUT_DIR", args.out_dir),
                                    ("--adapter", args.adapter), ("--force", args.force)) if given]
        if extra:
            raise UsageError(f"--check OUT_DIR verifies an existing export and takes no {', '.join(extra)}; "
                             f"expected either --check OUT_DIR or MODEL_DIR OUT_DIR. Fix: run the export and the "
                             "check as two commands")
        result = check(args.check, validate=args.validate, python_op=args.python_op,
                       decode_steps=args.decode_steps, threads=args.torch_threads)
        print(json.dumps(result, indent=2))
        return 0
    if args.model_dir is None or args.out_dir is None:
        missing = "MODEL_DIR and OUT_DIR are" if args.model_dir is None else "OUT_DIR is"
        raise UsageError(f"{missing} missing; expected milora-export MODEL_DIR OUT_DIR [options], or "
                         "milora-export --check OUT_DIR. Fix: e.g. milora-export ./my-model ./out")
    adapters = _adapters(args.adapter)
    opts = ExportOptions(dtype=args.dtype, opset=args.opset, slots=args.slots, lora_lowering=args.lora_lowering,
                         target=args.target, validate=args.validate, force=args.force,
                         decode_steps=args.decode_steps, python_op=args.python_op, progress=not args.quiet,
                         prefill_logits=args.prefill_logits, flavour=args.flavour,
                         torch_threads=args.torch_threads)
    manifest = export(args.model_dir, args.out_dir, adapters, opts)
    print(f"exported {len(manifest['tenants'])} tenant(s) to {args.out_dir} in {manifest['export_seconds']} s; "
          f"validation: {json.dumps(manifest['validation'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
