"""milora-build-engines as a Python API: TensorRT engines of an export's prefill and decode graphs.

    build_engines(out_dir, engine_dir, BuildOptions(precision="fp16", workspace_mib=2048))
    read_engines(engine_dir, manifest)      # engines.json, checked against the export

ENGINE_DIR:
    prefill.engine, decode.engine   serialized engines (this GPU and this TensorRT version only)
    timing.cache                    TensorRT's timing cache: a rebuild reuses the timings
    engines.json                    what was built, from what, with which profiles and options

Profiles, precision and the parsed graph are decided in profiles.py (tested without TensorRT);
this module only drives TensorRT. Engines must be built on the GPU model they run on (on a
Jetson, build on the Jetson): TensorRT tunes and compiles for the build GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from milora.errors import EngineBuildError, ManifestError
from milora.format.jsonfile import read_json
from milora.format import manifest as mf
from milora.plugins import profiles as pf


def _trt():
    from milora.plugins.trt_plugin import import_tensorrt, register

    trt, _ = import_tensorrt()
    register()
    return trt


def build_engines(out_dir: str | Path, engine_dir: str | Path, opts: pf.BuildOptions | None = None) -> dict[str, Any]:
    """Build the engines of OUT_DIR into ENGINE_DIR; returns engines.json's document. Everything
    that can be checked without TensorRT is checked first (options, profiles, precision)."""
    opts = opts or pf.BuildOptions()
    opts.check()
    out_dir, engine_dir = Path(out_dir), Path(engine_dir)
    manifest = mf.read_manifest(out_dir)
    mf.verify_files(out_dir, manifest)
    if manifest["target"] != "tensorrt":
        raise EngineBuildError(f"{out_dir} was exported for {manifest['target']}; TensorRT engines need the routed "
                               "LoRA plugin nodes. Fix: export with milora-export --target tensorrt")
    prof = pf.profiles(manifest, opts)
    qdq = any(pf.has_qdq(out_dir / manifest["graphs"][g]["file"]) for g in opts.graphs)
    plan = pf.precision_plan(opts.precision, manifest, qdq)
    trt = _trt()
    engine_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(opts.timing_cache) if opts.timing_cache else engine_dir / pf.TIMING_CACHE
    logger = trt.Logger(trt.Logger.VERBOSE if opts.verbose else trt.Logger.WARNING)
    built = {}
    for graph in opts.graphs:
        started = time.time()
        path = out_dir / manifest["graphs"][graph]["file"]
        data = _build_one(trt, logger, path, prof[graph], plan, opts, cache_path)
        (engine_dir / pf.engine_file(graph)).write_bytes(data)
        built[graph] = {"file": pf.engine_file(graph), "bytes": len(data), "seconds": round(time.time() - started, 1),
                        "profile": {n: [list(s) for s in shapes] for n, shapes in prof[graph].items()}}
    doc = {"format": pf.ENGINES_FORMAT, "format_version": 1, "tensorrt": trt.__version__, "device": _device(),
           "source": {"out_dir": str(out_dir.resolve()), "manifest_sha256": mf.sha256_file(out_dir / mf.MANIFEST_FILE)},
           "precision": opts.precision, "plan": plan, "options": pf.describe(opts, manifest), "graphs": built}
    (engine_dir / pf.ENGINES_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _build_one(trt, logger, path: Path, profile: dict, plan: dict, opts: pf.BuildOptions, cache_path: Path) -> bytes:
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # path lets the parser find weights.onnx.data next to the graph.
    if not parser.parse(pf.parser_graph(path, opts.plugin), str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {path}: {errors[:1500]}. Fix: export again with "
                               "milora-export --target tensorrt, and check the TensorRT version (>= 10.8)")
    config = builder.create_builder_config()
    if opts.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    for flag in plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan["clear_flags"]:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    if opts.optimization_level is not None:
        config.builder_optimization_level = opts.optimization_level
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    trt_profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = [n for n in names if n not in profile]
    if missing:
        raise EngineBuildError(f"the network of {path} has inputs the manifest does not list: {missing}; expected only "
                               f"{sorted(profile)}. Fix: export again (the files and manifest disagree)")
    for name in names:
        trt_profile.set_shape(name, *profile[name])
    config.add_optimization_profile(trt_profile)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {path} (see its log above; run with "
                               "--verbose for details). Fix: lower the profile maxima (--batch, --sequence, --past) or "
                               "raise --workspace; on a Jetson close other GPU work")
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(data)


def _device() -> dict[str, Any]:
    try:
        from milora.plugins.trt_plugin import capability

        return {"compute_capability": capability()}
    except Exception:  # noqa: BLE001 - recorded for information only
        return {"compute_capability": None}


def read_engines(engine_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """engines.json of ENGINE_DIR, checked against the export it was built from (the sha256 of
    its manifest.json) and for its engine files: ManifestError naming the problem."""
    engine_dir, out_dir = Path(engine_dir), Path(out_dir)
    path = engine_dir / pf.ENGINES_FILE
    if not path.is_file():
        raise ManifestError(f"{engine_dir} holds no {pf.ENGINES_FILE}; expected a directory written by "
                            f"milora-build-engines. Fix: milora-build-engines {out_dir} {engine_dir}")
    doc = read_json(path, ManifestError, f"build the engines again: milora-build-engines {out_dir} {engine_dir}",
                    "an engines record")
    if doc.get("format") != pf.ENGINES_FORMAT or not isinstance(doc.get("graphs"), dict):
        raise ManifestError(f"{path} is not a milora-build-engines record; build the engines again")
    want = mf.sha256_file(Path(out_dir) / mf.MANIFEST_FILE)
    if doc.get("source", {}).get("manifest_sha256") != want:
        raise ManifestError(f"the engines in {engine_dir} were built from another export than {out_dir} (manifest "
                            f"sha256 differs); expected engines of this export. Fix: milora-build-engines {out_dir} "
                            f"{engine_dir}")
    for graph in pf.GRAPHS:
        info = doc["graphs"].get(graph)
        if not isinstance(info, dict) or not (engine_dir / str(info.get("file"))).is_file():
            raise ManifestError(f"{engine_dir} has no {graph} engine; expected {pf.engine_file(graph)}. Fix: "
                                f"milora-build-engines {out_dir} {engine_dir} (both graphs)")
    return doc
