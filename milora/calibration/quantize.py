"""milora-quantize: a float32 export (OUT_DIR of milora-export) -> a quantized copy (QUANT_DIR) that
the runtime serves unchanged (docs/quantization.md).

QUANT_DIR is a complete export directory: the same manifest (graph IO contract, banks, tenants,
flavour), the same tenant packs, tokenizer and chat template; new prefill / decode graphs and
one shared weights file; and a "quantization" key in the manifest recording the precision, its
options, what stayed in high precision, the calibration coverage and the agreement with the
source. Written atomically (format/outdir.py): nothing appears unless the whole directory is
complete and its routing agreement passed the threshold (or --force-agreement).

Torch-free: onnx and onnxruntime (and its quantization tools) only.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import onnx

from milora.calibration import graph as cg
from milora.calibration import precisions as qp
from milora.errors import QuantizeError
from milora.export.branches import join, split
from milora.format import manifest as mf
from milora.format.outdir import check_out_dir, staged_directory

PRECISIONS = mf.QUANT_PRECISIONS  # the manifest defines them (format/manifest.py)
QUANT_TARGETS = ("onnxruntime", "tensorrt")
CALIB_METHODS = ("minmax", "entropy", "percentile", "distribution")
# Graph files quantize() rewrites; everything else of OUT_DIR is copied as is.
_REWRITTEN = (mf.PREFILL_FILE, mf.DECODE_FILE, mf.WEIGHTS_FILE, mf.MANIFEST_FILE)


@dataclass
class QuantizeOptions:
    precision: str = "int8-dynamic"
    # onnxruntime: graphs for onnxruntime's CPU / CUDA kernels. tensorrt: explicit-quantization
    # (Q/DQ) graphs in the form TensorRT consumes (int8-static, fp8 only; engines are built on a
    # GPU machine with milora-build-engines, docs/tensorrt.md).
    target: str = "onnxruntime"
    # int4 / int8-weight: MatMulNBits block size along K (16..256, a power of two) and accuracy level (0 unset,
    # 1 fp32, 2 fp16, 3 bf16, 4 int8 compute: the fastest on CPU).
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = True
    # int8: per output channel weight scales; reduce_range: 7-bit weights (older x86 without VNNI).
    per_channel: bool = True
    reduce_range: bool = False
    embedding: bool = True  # quantize the embedding Gather too (int8 / int4) where onnxruntime can
    lm_head: bool = True  # quantize the LM head MatMul (it is the largest weight MatMul)
    # mixed precision (mixed.py): weight MatMuls kept float32, by site selector (down_proj,
    # layers.0-3, lm_head, ...); auto_keep: search for the fewest that reach the threshold
    keep_float: list[str] = dataclasses.field(default_factory=list)
    auto_keep: bool = False
    # int8-static / fp8: calibration method and data (calibrate.py): a JSONL file of prompts or a
    # built-in task name (milora.train.tasks); None: the tenants' own validation prompts.
    calib_method: str = "minmax"
    percentile: float = 99.999
    calibration: str | None = None
    calib_samples: int = 32
    calib_decode_steps: int = 4
    # Agreement report (agreement.py): prompts per tenant, decode steps, threshold on routing agreement.
    report: bool = True
    report_prompts: int = 16
    report_steps: int = 4
    threshold: float = 0.99
    force_agreement: bool = False
    # tenant -> built-in task: score each on the task's test split, source and quantized (needs
    # a tokenizer in OUT_DIR; scored through the runtime's scoring, torch-free: options by
    # log-likelihood, math tasks by greedy generation and the answer's final number)
    eval_tasks: dict[str, str] = dataclasses.field(default_factory=dict)
    eval_samples: int = 20
    force: bool = False  # replace a non-empty QUANT_DIR
    progress: bool = True
    seed: int = 0

    @property
    def quantizes_embedding(self) -> bool:
        """Whether the embedding Gather is quantized: --embedding, except int8-weight (which keeps
        it float32: high_precision says why)."""
        return self.embedding and self.precision != "int8-weight"

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise QuantizeError(f"--precision {self.precision!r} is not supported; expected one of {', '.join(PRECISIONS)}")
        if self.target not in QUANT_TARGETS:
            raise QuantizeError(f"--target {self.target!r}; expected one of {', '.join(QUANT_TARGETS)}")
        if self.target == "tensorrt" and self.precision not in ("int8-static", "fp8"):
            raise QuantizeError(f"--target tensorrt takes explicit quantization (Q/DQ) graphs: --precision int8-static "
                                f"or fp8, got {self.precision}. Fix: pick one of those (for fp16 TensorRT, build the "
                                "engine from the float32 export with --fp16)")
        if self.precision == "fp8" and self.target != "tensorrt":
            raise QuantizeError("--precision fp8 writes Q/DQ graphs for TensorRT (onnxruntime's CPU kernels do not run "
                                "float8 MatMuls); add --target tensorrt or choose int8-static / int4")
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise QuantizeError(f"--block-size {self.block_size}; expected a power of two from 16 to 256 "
                                "(MatMulNBits), e.g. 32")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QuantizeError(f"--accuracy-level {self.accuracy_level}; expected 0 (unset), 1 (fp32), 2 (fp16), "
                                "3 (bf16) or 4 (int8 compute)")
        if self.calib_method not in CALIB_METHODS:
            raise QuantizeError(f"--calib-method {self.calib_method!r}; expected one of {', '.join(CALIB_METHODS)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise QuantizeError(f"--threshold {self.threshold}; expected a share between 0 and 1 (default 0.99)")
        from milora.train.data import TASKS

        bad = {t: k for t, k in self.eval_tasks.items() if k not in TASKS}
        if bad:
            raise QuantizeError(f"--eval-task {bad}: unknown task; expected one of {', '.join(TASKS)}")
        for name in ("calib_samples", "report_prompts", "report_steps", "eval_samples"):
            if getattr(self, name) < 1:
                raise QuantizeError(f"--{name.replace('_', '-')} {getattr(self, name)}; expected an integer >= 1")
        if not 0.0 < self.percentile <= 100.0:
            raise QuantizeError(f"--percentile {self.percentile}; expected a value in (0, 100]")
        from milora.calibration import mixed

        mixed.check_options(self)


def parse_eval_tasks(items: list[str]) -> dict[str, str]:
    """--eval-task TENANT=TASK (repeatable) -> {tenant: task}."""
    out = {}
    for item in items:
        tenant, sep, task = item.partition("=")
        if not sep or not tenant or not task:
            raise QuantizeError(f"--eval-task {item!r} is malformed; expected TENANT=TASK, e.g. --eval-task boolq=boolq")
        out[tenant] = task
    return out


# A hook applied to each quantized graph before it is saved: (model, graph name, plan) -> None.
# Tests plant faults with it (a perturbed router must be caught by the agreement report).
Transform = Callable[[onnx.ModelProto, str, cg.Plan], None]


def source_manifest(out_dir: Path) -> dict[str, Any]:
    """The source export's manifest, refused when milora-quantize cannot start from it."""
    if not out_dir.is_dir():
        raise QuantizeError(f"OUT_DIR {out_dir} is not a directory; expected an export of milora-export. "
                            "Fix: run milora-export first and pass its OUT_DIR")
    m = mf.read_manifest(out_dir)
    if m.get(mf.QUANTIZATION_KEY):
        raise QuantizeError(f"OUT_DIR {out_dir} is already quantized ({m[mf.QUANTIZATION_KEY]['precision']}); "
                            "expected a float32 export. Fix: quantize the float32 export it came from")
    if m["dtype"] != "float32":
        raise QuantizeError(f"OUT_DIR {out_dir} is a {m['dtype']} export; expected float32 (the quantizers and the "
                            "agreement report start from full precision). Fix: export again with --dtype fp32")
    if m["target"] != "onnxruntime":
        raise QuantizeError(f"OUT_DIR {out_dir} was exported for --target {m['target']}: its graphs hold the TensorRT "
                            "plugin op, which onnxruntime cannot run to calibrate or compare. Fix: export with "
                            "--target onnxruntime --flavour portable and pass --target tensorrt to milora-quantize")
    return m


def quantize(out_dir: str | Path, quant_dir: str | Path, options: QuantizeOptions | None = None,
             transform: Transform | None = None, **kwargs) -> dict[str, Any]:
    """Quantize OUT_DIR into QUANT_DIR; returns QUANT_DIR's manifest (its "quantization" key
    holds the agreement report). AgreementError (nothing written) when routing agreement is
    below the threshold, unless force_agreement."""
    opts = options or QuantizeOptions(**kwargs)
    opts.check()
    out_dir, quant_dir = Path(out_dir), Path(quant_dir)
    src = source_manifest(out_dir)
    if opts.target == "tensorrt" and src.get("flavour") == mf.FLAVOUR_FUSED:
        raise QuantizeError(f"OUT_DIR {out_dir} holds fused graphs (onnxruntime's own operators), which TensorRT "
                            "does not parse; expected a portable export for --target tensorrt. Fix: export with "
                            "--flavour portable")
    if quant_dir.resolve() == out_dir.resolve():
        raise QuantizeError(f"QUANT_DIR {quant_dir} is OUT_DIR; expected a new directory. Fix: choose another QUANT_DIR")
    check_out_dir(quant_dir, opts.force, "QUANT_DIR", QuantizeError)
    start = time.perf_counter()
    with staged_directory(quant_dir, "QUANT_DIR", "write the quantized export") as tmp:
        manifest = _quantize_into(out_dir, tmp, src, opts, transform)
        manifest[mf.QUANTIZATION_KEY]["seconds"] = round(time.perf_counter() - start, 2)
        mf.write_manifest(tmp, manifest)
    return mf.read_manifest(quant_dir)


def _bar(opts: QuantizeOptions, total: int):
    from milora.progress import progress

    # A bar on a terminal; in a log a line per sub-step and one at the end (as milora-export).
    return progress(total, "milora-quantize", "step", enabled=opts.progress, every=total)


def _quantize_into(out_dir: Path, tmp: Path, src: dict[str, Any], opts: QuantizeOptions,
                   transform: Transform | None) -> dict[str, Any]:
    from milora.export.shared_weights import SharedWeights

    bar = _bar(opts, 5)
    try:
        for p in out_dir.iterdir():  # tokenizer, chat template, packs, ...: as they are
            if p.name in _REWRITTEN or p.name.startswith("."):
                continue
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        bar.update()
        calib = None
        if opts.precision in ("int8-static", "fp8"):
            from milora.calibration.calibrate import calibration_set

            bar.set_description("calibrating")
            calib = calibration_set(out_dir, src, opts, uniform=opts.precision == "fp8")
        bar.update()
        search = None
        if opts.auto_keep:
            from milora.calibration import mixed

            bar.set_description("searching what stays float32")
            search = mixed.search_keep_float(out_dir, src, opts, calib, tmp)
            opts = dataclasses.replace(opts, keep_float=search["keep_float"])
        weights = SharedWeights(tmp / mf.WEIGHTS_FILE)
        kept: dict[str, Any] = {}
        try:
            for graph in mf.GRAPH_ROLES:
                if mf.graph_of(src, graph) != graph:  # the fused flavour: one graph for both phases, done
                    kept.setdefault(graph, kept[mf.graph_of(src, graph)])
                    bar.update()
                    continue
                bar.set_description(f"quantizing {graph}")
                model = onnx.load(str(out_dir / src["graphs"][graph]["file"]), load_external_data=True)
                phases = split(model, mf.ROUTE)
                if phases is None:
                    both = calib is not None and mf.graph_of(src, "decode") != "decode"  # one graph, both phases
                    model, kept[graph] = quantize_graph(model, graph, src, opts, calib.both_phases() if both else calib,
                                                        tmp)
                    if transform is not None:
                        transform(model, graph, cg.plan(model, src["base"]["vocab_size"]))
                else:  # the fused flavour's one graph: each phase's model apart, on its own calls
                    for role in phases:
                        phases[role], kept[role] = quantize_graph(phases[role], role, src, opts, calib, tmp)
                        if transform is not None:
                            transform(phases[role], role, cg.plan(phases[role], src["base"]["vocab_size"]))
                    model = join(phases, model, mf.ROUTE)
                qp.check_io(model, src["graphs"][graph], graph)
                weights.externalize(model, graph)
                onnx.save(model, str(tmp / src["graphs"][graph]["file"]))
                bar.update()
        finally:
            weights.close()
        manifest = dict(src)
        manifest["graphs"] = {g: dict(src["graphs"][g], external_initializers=weights.tables[mf.graph_of(src, g)])
                              for g in src["graphs"]}
        quant = {"precision": opts.precision, "target": opts.target, "options": _recorded_options(opts),
                 "graphs": kept, "high_precision": high_precision(opts),
                 "calibration": calib.coverage if calib is not None else None,
                 "keep_float": _kept_record(opts, kept, search),
                 "source": {"dir": str(out_dir), "weights_bytes": (out_dir / mf.WEIGHTS_FILE).stat().st_size},
                 "weights_bytes": (tmp / mf.WEIGHTS_FILE).stat().st_size}
        manifest[mf.QUANTIZATION_KEY] = quant
        if opts.report:  # (tensorrt: the Q/DQ graph run by onnxruntime, i.e. simulated quantization)
            from milora.calibration.agreement import agreement_report, check_agreement

            bar.set_description("agreement report")
            mf.write_manifest(tmp, manifest)  # the report opens tmp as an export (rewritten below)
            report = agreement_report(out_dir, tmp, src, opts)
            quant["agreement"] = report["summary"]
            (tmp / "quantization").mkdir(exist_ok=True)
            from milora.calibration.agreement import write_report

            write_report(report, tmp / "quantization")
            check_agreement(report, opts.threshold, opts.force_agreement, opts.precision)
        bar.update()
        return manifest
    finally:
        bar.close()


def _recorded_options(opts: QuantizeOptions) -> dict[str, Any]:
    keep = {"fp16": (), "int8-dynamic": ("per_channel", "reduce_range", "embedding", "lm_head"),
            "int8-static": ("per_channel", "embedding", "lm_head", "calib_method", "percentile", "calibration",
                            "calib_samples", "calib_decode_steps"),
            "fp8": ("per_channel", "lm_head", "calib_method", "percentile", "calibration", "calib_samples",
                    "calib_decode_steps"),
            "int4": ("block_size", "accuracy_level", "symmetric", "embedding", "lm_head"),
            "int8-weight": ("block_size", "accuracy_level", "symmetric", "lm_head")}[opts.precision]
    d = dataclasses.asdict(opts)
    keep += ("keep_float", "auto_keep") if opts.precision != "fp16" else ()
    return {k: d[k] for k in keep} | {"threshold": opts.threshold, "force_agreement": opts.force_agreement}


def _kept_record(opts: QuantizeOptions, graphs: dict[str, Any], search: dict[str, Any] | None) -> dict[str, Any] | None:
    """The weight MatMuls kept float32 by --keep-float / --auto-keep, by site (mixed.py)."""
    sites = list(dict.fromkeys(s for g in graphs.values() for s in g.get("kept_float", [])))  # graph order
    if not sites and search is None:
        return None
    return {"selectors": list(opts.keep_float), "matmuls": sites, "count": len(sites),
            "weights_bytes_float32": max((g.get("kept_float_bytes", 0) for g in graphs.values()), default=0),
            "search": search}


def high_precision(opts: QuantizeOptions) -> dict[str, str]:
    """What stays in higher precision, and why (recorded in the manifest, docs/quantization.md)."""
    out = {"adapter banks": "float32: graph inputs loaded per tenant at run time (a tenant is added without "
                            "re-quantizing), and small: rank x d per module and layer",
           "routers": "float32: a rounded router logit can flip a top-k choice and change which experts run",
           "gates, KV cache, graph IO": "float32: the runtime's contract with every export is unchanged"}
    if opts.precision == "fp16":
        out["compute"] = ("float32: base weights are stored float16 and cast to float32 when the session loads "
                          "(onnxruntime's CPU provider lacks float16 kernels the graphs use; docs/quantization.md)")
    else:
        out["norms, attention, softmax, residuals"] = "float32: only weight MatMuls (and the embedding) are quantized"
    if not opts.lm_head:
        out["LM head"] = "float32 (--no-lm-head)"
    if opts.keep_float:
        out["kept weight MatMuls"] = (f"float32 (--keep-float {' '.join(opts.keep_float)}"
                                      + (", found by --auto-keep" if opts.auto_keep else "")
                                      + "): their quantization disturbed the routing most; listed under keep_float")
    if opts.precision == "int8-weight":
        out["embedding"] = ("float32: 8-bit weight-only keeps the routing closest to float32 (its purpose), and the "
                            "embedding feeds every layer's router")
    elif not opts.embedding or opts.precision in ("fp8",) or opts.target == "tensorrt":
        out["embedding"] = "float32 (TensorRT quantizes no Gather)" if opts.target == "tensorrt" else "float32"
    return out


def quantize_graph(model: onnx.ModelProto, graph: str, manifest: dict[str, Any], opts: QuantizeOptions,
                   calib, scratch: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """One graph, quantized as opts says; returns it and a summary of what was targeted."""
    cg.name_nodes(model.graph)
    plan = cg.plan(model, manifest["base"]["vocab_size"])
    kept = None
    if opts.keep_float:
        from milora.calibration import mixed

        kept = mixed.keep_float(model, plan, manifest["base"], opts.keep_float)  # out of the plan
    if not opts.lm_head:
        plan.weight_matmuls = [n for n in plan.weight_matmuls if n not in plan.lm_head]
    if not opts.quantizes_embedding:
        plan.embedding = []
    summary = plan.summary()
    if kept is not None:
        summary["kept_float"], summary["kept_float_bytes"] = kept
    if opts.precision == "fp16":
        out = qp.to_fp16(model, plan)
    elif opts.precision == "int8-dynamic":
        out = qp.int8_dynamic(model, plan, opts, scratch)
    elif opts.precision in ("int4", "int8-weight"):
        out = qp.nbits(model, plan, opts, bits=4 if opts.precision == "int4" else 8)
    else:
        out = qp.qdq_static(model, plan, opts, calib.reader(graph), scratch, tensorrt=opts.target == "tensorrt",
                            fp8=opts.precision == "fp8")
    summary["ops_after"] = _op_counts(out, ("MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul",
                                            "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "Cast"))
    return out, summary


def _op_counts(model: onnx.ModelProto, ops: tuple[str, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ops:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts

