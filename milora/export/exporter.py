"""milora-export as a Python API: export() writes OUT_DIR atomically; check() re-validates one.

    export(model_dir, out_dir, adapters={"acme": "path"}, dtype="float32")
    check(out_dir)     # refuses tampered files; re-runs validation when the sources exist

OUT_DIR:
    manifest.json                the contract (milora.format.manifest)
    prefill.onnx                 router + prefill, gates out
    decode.onnx                  decode, gates in, no router
    weights.onnx.data            the external data of both graphs (each weight once)
    adapters/<tenant>.safetensors one slot pack per tenant
    tokenizer files              copied from MODEL_DIR
    polygraphy/<graph>_data.py   Polygraphy data loaders (milora/plugins/polygraphy_scripts.py; portable flavour)
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milora.errors import ExportError, ManifestError
from milora.format import manifest as mf
from milora.format.pack import build_pack, save_pack, tenant_options
from milora.export.lowering import DEFAULT_LOWERING, LOWERINGS
from milora.format.outdir import check_out_dir, staged_directory

DTYPES = {"fp32": "float32", "fp16": "float16", "float32": "float32", "float16": "float16"}
TARGETS = ("onnxruntime", "tensorrt")
DEFAULT_OPSET = 18
VALIDATION_TEXTS = ("The capital of France is", "def fibonacci(n):\n    return",
                    "Question: what is 12 times 7? Answer:", "Once upon a time")


@dataclass
class ExportOptions:
    dtype: str = "float32"
    opset: int = DEFAULT_OPSET
    slots: int | None = None  # default: tenants + 1
    lora_lowering: str = DEFAULT_LOWERING
    target: str = "onnxruntime"
    validate: bool = True
    force: bool = False
    decode_steps: int = 3
    python_op: bool = False  # validate a tensorrt-target graph with the Python op (float32)
    prefill_logits: str = "last"  # "last": prefill logits [B,1,V]; "all": [B,T,V] (manifest.LOGITS_POSITIONS)
    # Graph flavour (manifest.FLAVOURS): "auto" = fused wherever it applies (onnxruntime target,
    # float32, head_dim a multiple of 16, last-position prefill logits), else portable.
    flavour: str = "auto"
    # torch intra-op threads while exporting and validating (None: torch's default). On an
    # oversubscribed machine 1 is much faster: a SmolLM2 forward took 2.0 s with 2 threads
    # and 0.14 s with 1 on the shared 2-core dev box (load ~7).
    torch_threads: int | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"dtype {self.dtype!r} is not supported; expected fp32 or fp16")
        self.dtype = DTYPES[self.dtype]
        if self.lora_lowering not in LOWERINGS:
            raise ExportError(f"--lora-lowering {self.lora_lowering!r}; expected one of {', '.join(LOWERINGS)}")
        if self.target not in TARGETS:
            raise ExportError(f"--target {self.target!r}; expected one of {', '.join(TARGETS)}")
        if not 14 <= self.opset <= 20:
            raise ExportError(f"--opset {self.opset} is out of range; expected 14..20. Fix: pass --opset "
                              f"{DEFAULT_OPSET} (the default) or omit it")
        if self.python_op and (self.target != "tensorrt" or self.dtype != "float32"):
            raise ExportError(f"--python-op validates a --target tensorrt float32 export; got target {self.target}, "
                              f"dtype {self.dtype} (drop --python-op, the function body is validated instead)")
        if self.flavour not in ("auto", *mf.FLAVOURS):
            raise ExportError(f"--flavour {self.flavour!r} is not supported; expected auto, "
                              f"{', '.join(mf.FLAVOURS)}")
        if self.prefill_logits not in mf.LOGITS_POSITIONS:
            raise ExportError(f"--prefill-logits {self.prefill_logits!r}; expected one of "
                              f"{', '.join(mf.LOGITS_POSITIONS)}")
        if self.slots is not None and self.slots < 1:
            raise ExportError(f"--slots {self.slots} is out of range; expected at least 1 (slot 0 is the base model, "
                              "tenants take slots 1..N-1). Fix: pass --slots N with N >= tenants + 1, or omit it")
        if self.decode_steps < 1:
            raise ExportError(f"--decode-steps {self.decode_steps} is out of range; expected at least 1 (decode steps "
                              "checked by the validation). Fix: pass --decode-steps 1 or more, or --no-validate")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ExportError(f"--torch-threads {self.torch_threads} is out of range; expected at least 1. Fix: "
                              "pass --torch-threads 1 (or more), or omit it for torch's default")


def load_base(model_dir: Path, dtype: str):
    """The HF causal LM in MODEL_DIR (milora.model.load.load_base_model, ExportErrors)."""
    from milora.model.load import load_base_model

    return load_base_model(model_dir, dtype, ExportError, "MODEL_DIR")


def export(model_dir: str | Path, out_dir: str | Path, adapters: dict[str, str | Path] | None = None,
           options: ExportOptions | None = None, **kwargs) -> dict[str, Any]:
    """Export MODEL_DIR (+ adapters) to OUT_DIR; returns the manifest. Atomic: the work happens
    in a temporary sibling directory (.OUT.partial-PID) renamed at the end, removed on failure
    or interrupt; one left by a killed export is removed by the next once its process is gone."""
    from milora.export.tenants import discover

    opts = options or ExportOptions(**kwargs)
    opts.check()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_out_dir(out_dir, opts.force)
    # Tenant names become file names: refuse bad ones before anything is written.
    found = discover(model_dir, {k: Path(v) for k, v in (adapters or {}).items()})
    with staged_directory(out_dir, "OUT_DIR", "write the export") as tmp:
        with _steps(opts, 6 if opts.validate else 5) as bar, torch_threads(opts.torch_threads):
            manifest = _export_into(model_dir, tmp, found, opts, bar)
    return manifest


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Set torch's intra-op thread count for the block (None: leave it)."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _steps(opts: ExportOptions, total: int):
    from milora.progress import progress

    # In a log: a line per sub-step (set_description) and one at the end, no counter lines.
    return progress(total, "milora-export", "step", enabled=opts.progress, every=total)


def _export_into(model_dir: Path, tmp: Path, found: dict[str, Path], opts: ExportOptions, bar) -> dict[str, Any]:
    """found: tenant name -> adapter directory (tenants.discover)."""
    from milora.export.bank_model import BankModel, check_supported
    from milora.export.onnx_export import SharedWeights, export_graph
    from milora.export.tenants import load_tenant
    from milora.model.inject import base_info

    started = time.time()
    bar.set_description("loading model and adapters")
    hf = load_base(model_dir, opts.dtype)
    check_supported(hf)
    base = dict(base_info(hf), max_position_embeddings=getattr(hf.config, "max_position_embeddings", None))
    tenants = [load_tenant(n, d, base) for n, d in found.items()]
    if not tenants and opts.target == "onnxruntime":
        # Nothing to route: the graphs are the bare base model (the floor benchmarks compare to).
        opts = dataclasses.replace(opts, lora_lowering="none")
    slots = opts.slots or len(tenants) + 1
    if len(tenants) > slots - 1:
        raise ExportError(f"{len(tenants)} tenants ({', '.join(t.name for t in tenants)}) do not fit in {slots} "
                          f"slots (slot 0 is the base model, so at most {slots - 1} tenants); pass --slots "
                          f"{len(tenants) + 1} or more")
    max_rank = max([t.config.rank for t in tenants] or [1])
    opts = dataclasses.replace(opts, flavour=resolve_flavour(opts, base))
    bar.update()
    manifest = _manifest(model_dir, base, tenants, slots, max_rank, opts)
    (tmp / mf.PACK_DIR).mkdir()
    for t in tenants:
        pack = build_pack(t.config, t.tensors, base, max_rank, opts.dtype, where=f"tenant {t.name!r} ({t.source})")
        save_pack(tmp / manifest["tenants"][t.name]["pack"], pack)
    bar.update()
    core = BankModel(hf).eval()
    fused = None
    if opts.flavour == mf.FLAVOUR_FUSED:
        from milora.export.fused_model import FusedCore

        fused = FusedCore(core, base.get("max_position_embeddings"), pack_gate_up=bool(tenants)).eval()
    lowering = "tensorrt" if opts.target == "tensorrt" else opts.lora_lowering
    weights = SharedWeights(tmp / mf.WEIGHTS_FILE)
    try:
        for graph in mf.GRAPH_ROLES:
            if mf.graph_of(manifest, graph) == graph:  # the fused flavour's one graph serves decode too
                bar.set_description(f"exporting {graph if fused is None else 'the graph'}")
                spec = manifest["graphs"][graph]
                export_graph(core, graph, tmp / spec["file"], spec, opts.opset, lowering, weights, fused)
            bar.update()
    finally:
        weights.close()
    for graph in mf.GRAPH_ROLES:
        manifest["graphs"][graph]["external_initializers"] = weights.tables[mf.graph_of(manifest, graph)]
    for name in mf.TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, tmp / name)
    if opts.flavour == mf.FLAVOUR_PORTABLE:  # the graphs TensorRT parses (the fused ones are onnxruntime's)
        from milora.plugins.polygraphy_scripts import write_loader_scripts

        write_loader_scripts(tmp)  # polygraphy/<graph>_data.py (docs/tensorrt.md); hashed in the manifest like every file
    manifest["export_seconds"] = round(time.time() - started, 2)
    if opts.validate:
        bar.set_description("validating against PyTorch")
        manifest["validation"] = run_validation(tmp, manifest, hf, tenants, opts)
        bar.update()
    bar.update()
    mf.write_manifest(tmp, manifest)
    return mf.read_manifest(tmp)


def resolve_flavour(opts: ExportOptions, base: dict[str, Any]) -> str:
    """The graph flavour of this export: the one asked for, or for "auto" fused wherever it
    applies. Asking for fused where it cannot apply is an error that says why."""
    from milora.export.fused_model import check_fusable

    problems = check_fusable(base, opts.dtype)
    if opts.target != "onnxruntime":
        problems.append(f"target {opts.target} (the fused flavour uses onnxruntime's own operators)")
    if opts.prefill_logits != mf.LOGITS_LAST:
        problems.append(f"--prefill-logits {opts.prefill_logits} (the fused prefill emits the last position)")
    if opts.flavour == "auto":
        return mf.FLAVOUR_PORTABLE if problems else mf.FLAVOUR_FUSED
    if opts.flavour == mf.FLAVOUR_FUSED and problems:
        raise ExportError(f"--flavour fused does not apply to this export: {'; '.join(problems)}. Fix: pass "
                          "--flavour portable (or auto, which picks it)")
    return opts.flavour


def run_validation(root: Path, manifest: dict, hf, tenants, opts: ExportOptions) -> dict[str, Any]:
    from milora.export.validate import default_cases, real_prompts, validate

    real = real_prompts(root / "tokenizer.json", VALIDATION_TEXTS)
    cases = default_cases([t.name for t in tenants], manifest["base"]["vocab_size"], opts.decode_steps, real)
    report = validate(root, manifest, hf, {t.name: t for t in tenants}, cases, python_op=opts.python_op)
    return dict(report.summary(), decode_steps=opts.decode_steps, cases=len(cases),
                backend="onnxruntime" + (" + python RoutedLora" if opts.python_op else ""))


def _manifest(model_dir: Path, base: dict, tenants: list, slots: int, max_rank: int, opts: ExportOptions) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    import milora
    from milora.format.contract import EXPERTS

    graphs = {}
    for graph, file in (("prefill", mf.PREFILL_FILE), ("decode", mf.DECODE_FILE)):
        if opts.flavour == mf.FLAVOUR_FUSED:
            file = mf.MODEL_FILE  # one graph, both phases
        graphs[graph] = dict(file=file, data_file=mf.WEIGHTS_FILE, **mf.graph_io(
            graph, base, max_rank, opts.dtype, opts.prefill_logits, opts.flavour, lora=opts.lora_lowering != "none"))
    tenant_info = {}
    for slot, t in enumerate(tenants, start=1):
        tenant_info[t.name] = {"slot": slot, "pack": f"{mf.PACK_DIR}/{t.name}.safetensors", "kind": t.kind,
                               "source": str(t.source.resolve()), "options": tenant_options(t.config),
                               "config": t.config.to_json_dict(base)}
    return {
        "format": mf.MANIFEST_FORMAT, "format_version": mf.MANIFEST_VERSION,
        "tool_versions": {"milora": milora.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__, "onnx": onnx.__version__,
                          "onnxruntime": onnxruntime.__version__},
        "base": base, "experts": list(EXPERTS), "dtype": opts.dtype, "opset": opts.opset, "target": opts.target,
        "flavour": opts.flavour,
        "lora_lowering": "plugin" if opts.target == "tensorrt" else opts.lora_lowering, "max_rank": max_rank,
        "max_top_k": max([t.config.top_k for t in tenants if t.config.routed] or [0]), "slots": slots,
        "option_columns": list(mf.OPTION_COLUMNS),
        "option_codes": {"pooler": mf.POOLER_CODES, "activation": mf.ACTIVATION_CODES,
                         "activation_position": mf.POSITION_CODES, "gate_mode": mf.GATE_MODE_CODES},
        "graphs": graphs, "banks": mf.bank_specs(base, max_rank, opts.dtype), "tenants": tenant_info,
        "source": {"model_dir": str(model_dir.resolve()), "adapters": {t.name: str(t.source.resolve()) for t in tenants}},
        "validation": None, "export_seconds": None,
    }


def check(out_dir: str | Path, validate: bool = True, python_op: bool = False, decode_steps: int = 3,
          threads: int | None = None) -> dict[str, Any]:
    """Refuse an OUT_DIR whose files differ from its manifest (sha256), whose graphs do not
    parse or whose slot packs are malformed or non-finite (even when their sha256 matches, e.g.
    after a manifest was re-written), then re-run the validation against PyTorch when the
    recorded sources (model dir, adapters) still exist."""
    from milora.format.pack import load_pack
    from milora.export.tenants import load_tenant

    if decode_steps < 1:
        raise ExportError(f"--decode-steps {decode_steps} is out of range; expected at least 1. Fix: pass "
                          "--decode-steps 1 or more")
    out_dir = Path(out_dir)
    manifest = mf.read_manifest(out_dir)
    mf.verify_files(out_dir, manifest)
    _check_graphs(out_dir, manifest)
    for name, info in manifest["tenants"].items():
        load_pack(out_dir / info["pack"], manifest, where=f"tenant {name!r}")
    result: dict[str, Any] = {"files": len(manifest["files"]), "sha256": "ok", "packs": "ok"}
    src = manifest["source"]
    missing = [p for p in [src["model_dir"], *src["adapters"].values()] if not Path(p).exists()]
    if not validate or missing:
        result["validation"] = "skipped" if not validate else f"skipped: sources missing ({', '.join(missing)})"
        return result
    hf = load_base(Path(src["model_dir"]), manifest["dtype"])
    tenants = [load_tenant(n, Path(p), manifest["base"]) for n, p in src["adapters"].items()]
    opts = ExportOptions(dtype=manifest["dtype"], decode_steps=decode_steps, python_op=python_op)
    with torch_threads(threads):
        result["validation"] = run_validation(out_dir, manifest, hf, tenants, opts)
    return result


def _check_graphs(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Each graph file parses as an ONNX model (a truncated file does not)."""
    import onnx
    from google.protobuf.message import DecodeError

    for graph, spec in manifest["graphs"].items():
        path = out_dir / spec["file"]
        try:
            onnx.load(str(path), load_external_data=False)
        except (DecodeError, OSError, ValueError, RuntimeError) as exc:
            raise ManifestError(f"{path} ({graph} graph) cannot be parsed as ONNX ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else 'truncated or corrupt'}); "
                                   "expected a complete ONNX model. Fix: export again") from None


__all__ = ["ExportOptions", "check", "export"]
