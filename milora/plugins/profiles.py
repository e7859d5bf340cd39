"""What a TensorRT build of an export needs decided before TensorRT is touched: optimization
profiles from the manifest, the precision plan, the graph handed to the parser, and the
equivalent trtexec command lines. Plain Python (onnx only to read the graph); tested here.

Shape legend: B batch, T new tokens (prefill: the prompt), P past tokens, S slots.

Profiles (min / opt / max of each dynamic axis the manifest names; every other dimension is
fixed by the manifest):

    prefill   batch = B, sequence = T (prompt)                      slots = S (fixed)
    decode    batch = B, sequence = T (1 per step; more to score), past_sequence = P,
              total_sequence = P + T (the attention mask)           slots = S (fixed)
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from milora.errors import EngineBuildError, UsageError
from milora.format import manifest as mf
from milora.plugins import op_spec as rl

GRAPHS = ("prefill", "decode")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8", "fp8")
PLUGIN_MODES = ("aot", "jit")
DEFAULT_CONTEXT = 2048  # when the manifest gives no max_position_embeddings
AOT_ATTRIBUTE = "aot"  # int 1 on a plugin node: TensorRT's parser uses the plugin's aot_impl


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str, flag: str) -> "Range":
        """'MIN:OPT:MAX', or 'N' for a fixed size (N:N:N)."""
        parts = str(text).split(":")
        if len(parts) not in (1, 3) or not all(p.strip().isdigit() for p in parts):
            raise UsageError(f"{flag} {text!r} is malformed; expected MIN:OPT:MAX (e.g. 1:4:8) or one number N for a "
                             f"fixed size. Fix: e.g. {flag} 1:4:8")
        values = [int(p) for p in parts] * (3 if len(parts) == 1 else 1)
        return cls(*values)

    def check(self, flag: str, low: int = 1) -> "Range":
        if not low <= self.min <= self.opt <= self.max:
            raise UsageError(f"{flag} {self.min}:{self.opt}:{self.max} is out of order or range; expected "
                             f"{low} <= MIN <= OPT <= MAX. Fix: e.g. {flag} {low}:{max(low, self.opt)}:"
                             f"{max(low, self.max)}")
        return self

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass
class BuildOptions:
    """Options of milora-build-engines (docs/tensorrt.md). None: the default for the export."""

    precision: str = "auto"
    batch: Range | None = None
    sequence: Range | None = None  # prefill: prompt tokens
    decode_tokens: Range | None = None  # decode: new tokens per call (1 per step; more when scoring)
    past: Range | None = None  # decode: cached tokens
    workspace_mib: int | None = None
    timing_cache: Path | None = None  # default ENGINE_DIR/timing.cache
    optimization_level: int | None = None  # TensorRT builder optimization level 0..5
    plugin: str = "aot"
    graphs: tuple[str, ...] = GRAPHS
    verbose: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.plugin not in PLUGIN_MODES:
            raise UsageError(f"--plugin {self.plugin!r}; expected aot (the engine runs without Python) or jit")
        bad = [g for g in self.graphs if g not in GRAPHS]
        if bad or not self.graphs:
            raise UsageError(f"--graphs {list(self.graphs)}; expected one or both of prefill, decode")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise UsageError(f"--workspace {self.workspace_mib} is out of range; expected MiB >= 1 (e.g. 1024 on a "
                             "Jetson Orin Nano, 4096 or more on datacenter GPUs), or omit it for TensorRT's default")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise UsageError(f"--optimization-level {self.optimization_level} is out of range; expected 0..5 "
                             "(TensorRT's default is 3; 5 searches longest)")


def context_length(manifest: dict) -> int:
    return manifest["base"].get("max_position_embeddings") or DEFAULT_CONTEXT


def ranges(manifest: dict, opts: BuildOptions) -> dict[str, Range]:
    """The four ranges of an export, defaults filled in and checked against its context:
    batch 1:4:8, sequence 1:128:2048, decode tokens 1:1:16, past 1:512:(context - 16)."""
    ctx = context_length(manifest)
    batch = (opts.batch or Range(1, 4, 8)).check("--batch")
    seq_max = min(DEFAULT_CONTEXT, ctx)
    seq = (opts.sequence or Range(1, min(128, seq_max), seq_max)).check("--sequence")
    tok = (opts.decode_tokens or Range(1, 1, min(16, max(1, ctx - 1)))).check("--decode-tokens")
    past_max = max(1, min(ctx, 4 * DEFAULT_CONTEXT) - tok.max)
    past = (opts.past or Range(1, min(512, past_max), past_max)).check("--past")
    if seq.max > ctx:
        raise UsageError(f"--sequence max {seq.max} exceeds the model's context of {ctx} tokens "
                         "(max_position_embeddings); expected at most that. Fix: lower --sequence MAX")
    if past.max + tok.max > ctx:
        raise UsageError(f"--past max {past.max} + --decode-tokens max {tok.max} = {past.max + tok.max} exceeds the "
                         f"model's context of {ctx} tokens; expected at most {ctx}. Fix: lower --past MAX")
    return {"batch": batch, "sequence": seq, "decode_tokens": tok, "past": past}


def axis_values(graph: str, r: dict[str, Range], slots: int) -> dict[str, dict[str, int]]:
    """{"min" | "opt" | "max": {axis name: size}} of one graph."""
    out = {}
    for k in ("min", "opt", "max"):
        b, seq, past = getattr(r["batch"], k), getattr(r["sequence"], k), getattr(r["past"], k)
        tok = getattr(r["decode_tokens"], k)
        if graph == "prefill":
            out[k] = {mf.AXIS_BATCH: b, mf.AXIS_SEQ: seq, mf.AXIS_SLOTS: slots}
        else:
            out[k] = {mf.AXIS_BATCH: b, mf.AXIS_SEQ: tok, mf.AXIS_PAST: past, mf.AXIS_TOTAL: past + tok,
                      mf.AXIS_SLOTS: slots}
    return out


def resolve(shape: list, axes: dict[str, int], name: str = "?") -> tuple[int, ...]:
    """A manifest shape (ints and axis names) with the axes replaced by sizes."""
    dims = []
    for d in shape:
        if isinstance(d, str) and d not in axes:
            raise EngineBuildError(f"input {name} has the axis {d!r}, which milora-build-engines does not know; "
                                   f"expected one of {sorted(axes)}: the export is from another milora version")
        dims.append(axes[d] if isinstance(d, str) else int(d))
    return tuple(dims)


def profiles(manifest: dict, opts: BuildOptions) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """{graph: {input name: (min shape, opt shape, max shape)}} for every graph input."""
    r = ranges(manifest, opts)
    out = {}
    for graph in GRAPHS:
        axes = axis_values(graph, r, manifest["slots"])
        out[graph] = {i["name"]: tuple(resolve(i["shape"], axes[k], i["name"]) for k in ("min", "opt", "max"))
                      for i in manifest["graphs"][graph]["inputs"]}
    return out


def has_qdq(graph_path: Path) -> bool:
    """Whether an ONNX graph holds QuantizeLinear / DequantizeLinear nodes (explicit quantization)."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}
    return bool(ops & {"QuantizeLinear", "DequantizeLinear"})


def precision_plan(precision: str, manifest: dict, qdq: bool) -> dict[str, Any]:
    """How the network is typed and which builder flags are set:

        auto       strongly typed: the graph's types as exported
        fp32       float32 export only; strongly typed, TF32 off (onnxruntime's float32 numbers)
        fp16/bf16  a float32 export: weakly typed with the FP16 / BF16 flag (TensorRT picks per
                   layer); fp16 of a float16 export = auto
        int8/fp8   explicit quantization only: the graph must hold Q/DQ nodes; strongly typed
    """
    dtype = manifest["dtype"]
    if precision == "auto":
        return {"strongly_typed": True, "flags": [], "clear_flags": []}
    if precision in ("int8", "fp8"):
        if not qdq:
            raise EngineBuildError(
                f"--precision {precision} needs a graph with QuantizeLinear/DequantizeLinear nodes (explicit "
                f"quantization), but this export's graphs have none; implicit calibration is not supported. Fix: "
                f"quantize the graphs first (e.g. with NVIDIA TensorRT Model Optimizer, writing Q/DQ nodes), or build "
                f"with --precision fp16 / bf16")
        return {"strongly_typed": True, "flags": [], "clear_flags": []}
    if precision == "fp32":
        if dtype != "float32":
            raise EngineBuildError(f"--precision fp32 needs a float32 export; this one is {dtype}. Fix: export again "
                                   "with milora-export --dtype fp32, or build with --precision auto")
        return {"strongly_typed": True, "flags": [], "clear_flags": ["TF32"]}
    if dtype == "float16":
        if precision == "bf16":
            raise EngineBuildError("--precision bf16 needs a float32 export (bf16 cannot recover what float16 "
                                   "rounded away); this one is float16. Fix: export with --dtype fp32 and build with "
                                   "--precision bf16, or build this one with --precision fp16")
        return {"strongly_typed": True, "flags": [], "clear_flags": []}
    return {"strongly_typed": False, "flags": [precision.upper()], "clear_flags": []}


def parser_graph(graph_path: Path, plugin: str) -> bytes:
    """The graph TensorRT's parser reads: the exported file with every RoutedLora node marked
    aot = 1 (plugin "aot"), serialized without its weights (the parser reads weights.onnx.data
    next to the file). The file on disk is not changed (its sha256 is in the manifest)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(graph_path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == rl.OP_TYPE and n.domain == rl.DOMAIN]
    if not nodes:
        raise EngineBuildError(f"{graph_path} has no {rl.DOMAIN}::{rl.OP_TYPE} nodes: it was exported for "
                               "onnxruntime, whose LoRA lowering would run every module of every row in TensorRT. "
                               "Fix: export with milora-export --target tensorrt")
    if plugin == "aot":
        for n in nodes:
            if not any(a.name == AOT_ATTRIBUTE for a in n.attribute):
                n.attribute.append(helper.make_attribute(AOT_ATTRIBUTE, 1))
    return model.SerializeToString()


def _shapes_arg(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, s))}" for name, s in shapes.items())


def trtexec_commands(out_dir: Path, engine_dir: Path, manifest: dict, opts: BuildOptions) -> list[str]:
    """trtexec equivalents of a build, and trtexec runs of the engines it writes (opt shapes).
    trtexec cannot load the Python plugin, so building must go through milora-build-engines;
    an engine built with the ahead-of-time plugin runs in trtexec (or C++) without Python."""
    prof = profiles(manifest, opts)
    plan = precision_plan(opts.precision, manifest, qdq=False) if opts.precision not in ("int8", "fp8") else \
        {"strongly_typed": True, "flags": [], "clear_flags": []}
    lines = ["# Build settings (for reference: trtexec cannot register milora's Python plugin; build with "
             "milora-build-engines)"]
    for graph in opts.graphs:
        p = prof[graph]
        args = ["trtexec", f"--onnx={out_dir / manifest['graphs'][graph]['file']}",
                f"--saveEngine={engine_dir / engine_file(graph)}"]
        args += [f"--{k}Shapes={_shapes_arg({n: s[i] for n, s in p.items()})}" for i, k in enumerate(("min", "opt", "max"))]
        args += ["--stronglyTyped"] if plan["strongly_typed"] else [f"--{f.lower()}" for f in plan["flags"]]
        args += ["--noTF32"] if "TF32" in plan["clear_flags"] else []
        args += [f"--memPoolSize=workspace:{opts.workspace_mib}M"] if opts.workspace_mib else []
        args += [f"--timingCacheFile={opts.timing_cache or engine_dir / TIMING_CACHE}"]
        args += [f"--builderOptimizationLevel={opts.optimization_level}"] if opts.optimization_level is not None else []
        lines.append(" ".join(shlex.quote(a) for a in args))
    lines.append("# Run / profile the built engines at the opt shapes (no Python needed with --plugin aot)")
    for graph in opts.graphs:
        shapes = {n: s[1] for n, s in prof[graph].items()}
        lines.append(" ".join(shlex.quote(a) for a in ["trtexec", f"--loadEngine={engine_dir / engine_file(graph)}",
                                                        f"--shapes={_shapes_arg(shapes)}", "--useCudaGraph",
                                                        "--noDataTransfers"]))
    return lines


ENGINES_FILE = "engines.json"
ENGINES_FORMAT = "milora-engines"
TIMING_CACHE = "timing.cache"


def engine_file(graph: str) -> str:
    return f"{graph}.engine"


def describe(opts: BuildOptions, manifest: dict) -> dict[str, Any]:
    """The options as recorded in engines.json (ranges resolved)."""
    d = {k: v for k, v in asdict(opts).items() if k not in ("batch", "sequence", "decode_tokens", "past", "extra")}
    d.update({k: str(v) for k, v in ranges(manifest, opts).items()})
    d["timing_cache"] = str(opts.timing_cache) if opts.timing_cache else None
    d["graphs"] = list(opts.graphs)
    return d
