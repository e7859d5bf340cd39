"""milora-build-engines: TensorRT engines of an export (thin layer over milora.plugins.build).

    milora-build-engines OUT_DIR ENGINE_DIR [--precision auto|fp32|fp16|bf16|int8|fp8]
        [--batch 1:4:8] [--sequence 1:128:2048] [--decode-tokens 1:1:16] [--past 1:512:2032]
        [--workspace MIB] [--timing-cache FILE] [--optimization-level 0..5] [--plugin aot|jit]
        [--graphs prefill decode] [--print-trtexec] [--verbose]

--print-trtexec prints the equivalent trtexec settings and the trtexec runs of the engines,
and builds nothing (it needs no TensorRT). docs/tensorrt.md has the Jetson notes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from milora.cli_errors import ArgumentParser, cli_main
from milora.plugins import profiles as pf


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="milora-build-engines", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="a directory written by milora-export --target tensorrt")
    p.add_argument("engine_dir", type=Path, help="where the engines, the timing cache and engines.json go")
    p.add_argument("--precision", default="auto", choices=pf.PRECISIONS,
                   help="auto: the export's types (strongly typed); fp32 (TF32 off); fp16 / bf16 (a float32 export: "
                        "TensorRT picks per layer); int8 / fp8 only for graphs with Q/DQ nodes")
    for flag, what in (("--batch", "rows per call (default 1:4:8)"),
                       ("--sequence", "prefill prompt tokens (default 1:128:min(2048, context))"),
                       ("--decode-tokens", "decode tokens per call: 1 per step, more to score (default 1:1:16)"),
                       ("--past", "decode cached tokens (default 1:512:context-16)")):
        p.add_argument(flag, metavar="MIN:OPT:MAX", help=what)
    p.add_argument("--workspace", type=int, metavar="MIB", help="TensorRT workspace limit in MiB (Jetson: 512-2048)")
    p.add_argument("--timing-cache", type=Path, help="timing cache file (default ENGINE_DIR/timing.cache)")
    p.add_argument("--optimization-level", type=int, help="TensorRT builder optimization level 0..5 (default 3)")
    p.add_argument("--plugin", default="aot", choices=pf.PLUGIN_MODES,
                   help="aot: the routed LoRA kernel compiled into the engine (no Python when running); jit: "
                        "Python callback (debugging; needs torch and triton where it runs)")
    p.add_argument("--graphs", nargs="+", default=list(pf.GRAPHS), choices=pf.GRAPHS)
    p.add_argument("--print-trtexec", action="store_true", help="print trtexec equivalents and build nothing")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def options(args) -> pf.BuildOptions:
    def rng(value, flag):
        return None if value is None else pf.Range.parse(value, flag)

    opts = pf.BuildOptions(precision=args.precision, batch=rng(args.batch, "--batch"),
                           sequence=rng(args.sequence, "--sequence"),
                           decode_tokens=rng(args.decode_tokens, "--decode-tokens"), past=rng(args.past, "--past"),
                           workspace_mib=args.workspace, timing_cache=args.timing_cache,
                           optimization_level=args.optimization_level, plugin=args.plugin, graphs=tuple(args.graphs),
                           verbose=args.verbose)
    opts.check()
    return opts


@cli_main("milora-build-engines")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = options(args)
    from milora.format import manifest as mf

    manifest = mf.read_manifest(args.out_dir)
    if args.print_trtexec:
        pf.ranges(manifest, opts)  # refuse bad ranges before printing
        print("\n".join(pf.trtexec_commands(args.out_dir, args.engine_dir, manifest, opts)))
        return 0
    from milora.plugins.build import build_engines

    doc = build_engines(args.out_dir, args.engine_dir, opts)
    print(f"built {', '.join(doc['graphs'])} with TensorRT {doc['tensorrt']} into {args.engine_dir}: "
          f"{json.dumps({g: i['seconds'] for g, i in doc['graphs'].items()})} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
