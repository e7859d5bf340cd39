"""The exported directory's contract: file names, graph IO names and axes, bank tensors and
the manifest.json schema. Defined once here, read by the exporter, the validator, the
documented example and the runtime. Free of torch and onnx: numpy only.

Shape legend: B batch, T new tokens, P past tokens, L layers, E = 7 experts (contract.EXPERTS),
S adapter slots, R the export's max rank, Hkv KV heads, D head dim, V vocab, d hidden size.

Graphs (names below; every graph input/output is also listed, with shapes, in manifest.json):
  prefill: input_ids [B,T] int64, attention_mask [B,T] int64 (left padding), tenant_slots [B]
           int64, LoRA banks, router banks, slot options
        -> logits [B,1,V] (last position; [B,T,V] when exported with prefill logits "all"),
           present.{i}.key/value [B,Hkv,T,D], gates [B,L,E] float32
  decode:  input_ids [B,T] int64, attention_mask [B,P+T] int64, past_key_values.{i}.key/value
           [B,Hkv,P,D], tenant_slots [B], gates [B,L,E] float32, LoRA banks
        -> logits [B,T,V], present.{i}.key/value [B,Hkv,P+T,D]          (no router)
Position ids are computed inside the graphs from attention_mask (cumsum - 1), as the PyTorch
reference does, so a runtime only has to extend the mask.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from milora.format.adapter import module_dims
from milora.format.contract import EXPERTS, NUM_EXPERTS
from milora.format.jsonfile import json_kind, read_json
from milora.errors import ManifestError

MANIFEST_FORMAT = "milora-export"
MANIFEST_VERSION = 3  # 2: graph flavours (portable, fused); 3: the fused flavour is one graph for both phases
MANIFEST_FILE = "manifest.json"
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
# The fused flavour's one graph: graphs.prefill and graphs.decode both name it (same file, same
# IO); the runtime opens it once, so the weights are loaded and prepacked once.
MODEL_FILE = "model.onnx"
# The external data of BOTH graphs: each base weight once, at the same offset for both, so
# disk and a runtime that maps it (milora.runtime.weights) hold the weights once.
# graphs.<g>.external_initializers maps each graph's initializer names to
# {offset, length, dtype, shape} in it (the names differ between graphs for folded weights).
WEIGHTS_FILE = "weights.onnx.data"
PACK_DIR = "adapters"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")

# Dtype names used in manifest.json (banks, graph IO) and their numpy types.
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
             "bool": np.bool_}

# ---- graph IO names ----
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TENANT_SLOTS = "tenant_slots"
GATES = "gates"
LOGITS = "logits"
# Fused flavour (KV written in place per row): seqlens_k[b] = row b's tokens after the call - 1,
# total_sequence_length = the longest row's tokens after the call.
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
# Fused flavour: ROUTE [] bool, true for a prefill (this call's tokens are the prompts, the KV
# buffers hold nothing yet: the routers run and the graph builds the LoRA rows itself), false
# for decode (the lora.* inputs carry the routing). LOGITS_INDEX [B, P] int64: the positions,
# among this call's T tokens, whose logits come out ([B, P, V]).
ROUTE = "route"
LOGITS_INDEX = "logits_index"
# Fused flavour output: each layer's router logits [B, L, 7] of a prefill (-1e30 for experts the
# row's tenant lacks; 0 on rows whose tenant is not routed, and in decode). The agreement
# report reads the routers' margins from it.
ROUTER_LOGITS = "router_logits"

# Graph flavours. portable: standard ONNX ops, concat KV, left padding, a prefill and a decode
# graph (any runtime, the TensorRT target). fused: onnxruntime's fused operators
# (GroupQueryAttention with rotary inside and KV updated in place,
# SkipSimplifiedLayerNormalization, packed QKV and gate/up projections), right padding, ONE
# graph for both phases (ROUTE switches), decode fed per-batch LoRA inputs (lora_batch.py).
FLAVOUR_PORTABLE, FLAVOUR_FUSED = "portable", "fused"
FLAVOURS = (FLAVOUR_PORTABLE, FLAVOUR_FUSED)
# onnxruntime's GroupQueryAttention needs a head dim that is a multiple of this.
FUSED_HEAD_DIM_MULTIPLE = 16

# LoRA groups of the fused graphs: where an update is added to a (packed) projection.
LORA_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)), ("gate_up", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)))


def lora_group_layout(base: dict[str, Any]) -> dict[str, tuple[int, int, dict[str, tuple[int, int]]]]:
    """group -> (d_in, d_out, {module: (first output column, width)}) of the packed projection."""
    dims = module_dims(base)
    out = {}
    for g, modules in LORA_GROUPS:
        cols, at = {}, 0
        for m in modules:
            cols[m] = (at, dims[m][1])
            at += dims[m][1]
        out[g] = (dims[modules[0]][0], at, cols)
    return out


GRAPH_ROLES = ("prefill", "decode")


def graph_of(manifest: dict[str, Any], role: str) -> str:
    """The first role (GRAPH_ROLES order) whose graph file `role` also uses: `role` itself, or
    "prefill" for decode in the fused flavour, whose one graph serves both. Open, quantize or
    trace each graph once: for every role whose graph_of is another, reuse that one's."""
    graphs = manifest["graphs"]
    return next(r for r in GRAPH_ROLES if graphs[r]["file"] == graphs[role]["file"])


def lora_inputs(layer: int, group: str) -> tuple[str, str, str]:
    """(rows, A, B): the fused decode graph's per-batch LoRA inputs of one layer and group."""
    return tuple(f"lora.{layer}.{group}.{part}" for part in ("rows", "A", "B"))  # type: ignore[return-value]

# Which positions a graph's logits cover, recorded per graph as "logits_positions". Prefill
# emits the last position by default: serving samples from it alone, and the LM head over
# every prompt token (V = 49152 for SmolLM2) costs time to first token and memory. "all"
# keeps [B,T,V] for users who score prompts. Decode always emits all its T new positions.
LOGITS_LAST, LOGITS_ALL = "last", "all"
LOGITS_POSITIONS = (LOGITS_LAST, LOGITS_ALL)
LOGITS_INDEXED = "indexed"  # the fused graph: the positions its LOGITS_INDEX input names


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


# ---- bank tensors (graph inputs; one slot pack holds one slot's slice, without the S axis) ----
# Layout is the math layout (y = x @ A @ B) so the graphs need no Transpose per step; the
# tenant's scale alpha / r is folded into lora_B and ranks are zero-padded to R (exact).
MAX_RATIONAL_NUM = 7  # numerator coefficients, degree 6 (paper) ; (5, 4) is zero-padded
MAX_RATIONAL_DEN = 5
POOLER_CODES = {"attention": 0, "last": 1, "mean": 2, "max": 3}
ACTIVATION_CODES = {"rational": 0, "gelu": 1, "relu": 2, "identity": 3}
POSITION_CODES = {"post_pool": 0, "pre_pool": 1}
GATE_MODE_CODES = {"paper": 0, "renormalized": 1}
# Columns of slot.options [S, 6] int64.
OPTION_COLUMNS = ("pooler", "activation", "activation_position", "gate_mode", "top_k", "routed")


def lora_a_bank(module: str) -> str:
    return f"lora_A.{module}"


def lora_b_bank(module: str) -> str:
    return f"lora_B.{module}"


ROUTER_WEIGHT = "router.weight"
ROUTER_POOLER = "router.pooler"
ROUTER_ACT_NUM = "router.act_num"
ROUTER_ACT_DEN = "router.act_den"
SLOT_OPTIONS = "slot.options"
SLOT_EXPERT_MASK = "slot.expert_mask"
SLOT_FIXED_GATES = "slot.fixed_gates"
ROUTER_BANKS = (ROUTER_WEIGHT, ROUTER_POOLER, ROUTER_ACT_NUM, ROUTER_ACT_DEN, SLOT_OPTIONS, SLOT_EXPERT_MASK,
                SLOT_FIXED_GATES)


def bank_specs(base: dict[str, Any], max_rank: int, lora_dtype: str) -> dict[str, dict[str, Any]]:
    """Every bank tensor: name -> {shape (per slot, without S), dtype, graphs using it}."""
    nl, d = base["num_layers"], base["hidden_size"]
    specs: dict[str, dict[str, Any]] = {}
    for m, (d_in, d_out) in module_dims(base).items():
        specs[lora_a_bank(m)] = {"shape": [nl, d_in, max_rank], "dtype": lora_dtype, "graphs": ["prefill", "decode"]}
        specs[lora_b_bank(m)] = {"shape": [nl, max_rank, d_out], "dtype": lora_dtype, "graphs": ["prefill", "decode"]}
    router = {ROUTER_WEIGHT: [nl, d, NUM_EXPERTS], ROUTER_POOLER: [nl, d], ROUTER_ACT_NUM: [nl, MAX_RATIONAL_NUM],
              ROUTER_ACT_DEN: [nl, MAX_RATIONAL_DEN], SLOT_EXPERT_MASK: [NUM_EXPERTS],
              SLOT_FIXED_GATES: [NUM_EXPERTS]}
    for name, shape in router.items():
        specs[name] = {"shape": shape, "dtype": "float32", "graphs": ["prefill"]}
    specs[SLOT_OPTIONS] = {"shape": [len(OPTION_COLUMNS)], "dtype": "int64", "graphs": ["prefill"]}
    return specs


def bank_names(graph: str) -> list[str]:
    """Bank inputs of one graph, in graph-input order."""
    names = [n for m in EXPERTS for n in (lora_a_bank(m), lora_b_bank(m))]
    return names + list(ROUTER_BANKS) if graph == "prefill" else names


# Dynamic axis names, shared by both graphs and the manifest.
AXIS_BATCH, AXIS_SEQ, AXIS_PAST, AXIS_TOTAL, AXIS_SLOTS = "batch", "sequence", "past_sequence", "total_sequence", "slots"
AXIS_CAPACITY = "kv_capacity"  # fused flavour: the KV buffer's length
AXIS_LOGITS = "logits_positions"  # fused flavour: positions per row whose logits are asked for


def graph_io(graph: str, base: dict[str, Any], max_rank: int, dtype: str,
             prefill_logits: str = LOGITS_LAST, flavour: str = FLAVOUR_PORTABLE, lora: bool = True) -> dict[str, Any]:
    """{'inputs': [...], 'outputs': [...], 'logits_positions': 'last' | 'all'}; inputs and
    outputs each {name, shape (ints or axis names), dtype}. prefill_logits applies to prefill.
    lora False (an export without tenants): the fused graph has no tenant inputs."""
    if prefill_logits not in LOGITS_POSITIONS:
        raise ValueError(f"prefill_logits={prefill_logits!r}; expected one of {LOGITS_POSITIONS}")
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour={flavour!r}; expected one of {FLAVOURS}")
    if flavour == FLAVOUR_FUSED:
        return _fused_io(base, max_rank, dtype, lora)
    nl, hkv, hd, v = base["num_layers"], base["num_kv_heads"], base["head_dim"], base["vocab_size"]
    b, t = AXIS_BATCH, AXIS_SEQ
    kv_len = t if graph == "prefill" else AXIS_TOTAL
    inputs = [{"name": INPUT_IDS, "shape": [b, t], "dtype": "int64"},
              {"name": ATTENTION_MASK, "shape": [b, kv_len], "dtype": "int64"}]
    if graph == "decode":
        for i in range(nl):
            for name in (past_key(i), past_value(i)):
                inputs.append({"name": name, "shape": [b, hkv, AXIS_PAST, hd], "dtype": dtype})
    inputs.append({"name": TENANT_SLOTS, "shape": [b], "dtype": "int64"})
    if graph == "decode":
        inputs.append({"name": GATES, "shape": [b, nl, NUM_EXPERTS], "dtype": "float32"})
    specs = bank_specs(base, max_rank, dtype)
    for name in bank_names(graph):
        inputs.append({"name": name, "shape": [AXIS_SLOTS, *specs[name]["shape"]], "dtype": specs[name]["dtype"]})
    positions = prefill_logits if graph == "prefill" else LOGITS_ALL
    outputs = [{"name": LOGITS, "shape": [b, 1 if positions == LOGITS_LAST else t, v], "dtype": dtype}]
    for i in range(nl):
        for name in (present_key(i), present_value(i)):
            outputs.append({"name": name, "shape": [b, hkv, kv_len, hd], "dtype": dtype})
    if graph == "prefill":
        outputs.append({"name": GATES, "shape": [b, nl, NUM_EXPERTS], "dtype": "float32"})
    return {"inputs": inputs, "outputs": outputs, "logits_positions": positions}


def _fused_io(base: dict[str, Any], max_rank: int, dtype: str, lora: bool) -> dict[str, Any]:
    """The fused flavour's one graph, prefill (ROUTE true) and decode (ROUTE false) alike: KV
    buffers [B, Hkv, capacity, D] updated in place (present is the past buffer), per-row
    lengths (seqlens_k, no mask), the banks (read by the routers and the prefill's LoRA rows),
    the per-batch LoRA inputs of decode (lora_batch.py; empty in a prefill), the positions whose
    logits come out. lora False (an export without tenants): no slots, routing, banks or LoRA."""
    nl, hkv, hd, v = base["num_layers"], base["num_kv_heads"], base["head_dim"], base["vocab_size"]
    b, t = AXIS_BATCH, AXIS_SEQ
    inputs = [{"name": INPUT_IDS, "shape": [b, t], "dtype": "int64"},
              {"name": SEQLENS_K, "shape": [b], "dtype": "int32"},
              {"name": TOTAL_SEQUENCE_LENGTH, "shape": [], "dtype": "int32"},
              {"name": LOGITS_INDEX, "shape": [b, AXIS_LOGITS], "dtype": "int64"}]
    for i in range(nl):
        for name in (past_key(i), past_value(i)):
            inputs.append({"name": name, "shape": [b, hkv, AXIS_CAPACITY, hd], "dtype": dtype})
    if lora:
        inputs += [{"name": TENANT_SLOTS, "shape": [b], "dtype": "int64"},
                   {"name": ROUTE, "shape": [], "dtype": "bool"}]
        specs = bank_specs(base, max_rank, dtype)
        for name in bank_names("prefill"):
            inputs.append({"name": name, "shape": [AXIS_SLOTS, *specs[name]["shape"]], "dtype": specs[name]["dtype"]})
    layout = lora_group_layout(base)
    for l in range(nl if lora else 0):
        for g, _ in LORA_GROUPS:
            d_in, d_out, _ = layout[g]
            rows, a, bb = lora_inputs(l, g)
            n, r = f"lora_{l}_{g}_rows", f"lora_{l}_{g}_rank"
            inputs += [{"name": rows, "shape": [n, 1], "dtype": "int64"},
                       {"name": a, "shape": [n, d_in, r], "dtype": dtype},
                       {"name": bb, "shape": [n, r, d_out], "dtype": dtype}]
    outputs = [{"name": LOGITS, "shape": [b, AXIS_LOGITS, v], "dtype": dtype}]
    for i in range(nl):
        for name in (present_key(i), present_value(i)):
            outputs.append({"name": name, "shape": [b, hkv, AXIS_CAPACITY, hd], "dtype": dtype})
    outputs += [{"name": GATES, "shape": [b, nl, NUM_EXPERTS], "dtype": "float32"},
                {"name": ROUTER_LOGITS, "shape": [b, nl, NUM_EXPERTS], "dtype": "float32"}]
    return {"inputs": inputs, "outputs": outputs, "logits_positions": LOGITS_INDEXED}


# ---- manifest.json ----
# Top-level keys, in the order they are written. A runtime reads these and nothing else.
MANIFEST_KEYS = ("format", "format_version", "tool_versions", "base", "experts", "dtype", "opset", "target",
                 "flavour", "lora_lowering", "max_rank", "max_top_k", "slots", "option_columns", "option_codes",
                 "graphs", "banks", "tenants", "source", "validation", "export_seconds", "files")
# Written only by milora-quantize (milora/calibration), after "files": {precision, options,
# what stayed in high precision, calibration coverage, the agreement with the source export}.
# A runtime needs none of it (the graph IO contract is the one above); it records what was done.
QUANTIZATION_KEY = "quantization"
OPTIONAL_KEYS = (QUANTIZATION_KEY,)
QUANT_PRECISIONS = ("fp16", "int8-dynamic", "int8-static", "int8-weight", "int4", "fp8")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest, keyed by relative POSIX path."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE}


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest = dict(manifest, files=file_hashes(root))
    ordered = {k: manifest[k] for k in MANIFEST_KEYS}
    ordered.update({k: manifest[k] for k in OPTIONAL_KEYS if manifest.get(k) is not None})
    (root / MANIFEST_FILE).write_text(json.dumps(ordered, indent=2) + "\n")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """manifest.json of an exported directory, checked against the schema below (types, ranges,
    relative paths inside root): ManifestError naming the first problem, never another error."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{root} holds no {MANIFEST_FILE}; expected a directory written by milora-export")
    manifest = read_json(path, ManifestError, "export again", "a manifest", require_object=False)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        seen = manifest.get("format") if isinstance(manifest, dict) else json_kind(manifest)
        raise ManifestError(f"{path} is not a milora-export manifest (format={seen!r}), expected format "
                            f"{MANIFEST_FORMAT!r}: export again")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: format_version={manifest.get('format_version')!r}, this milora reads "
                            f"{MANIFEST_VERSION}; export again with this version")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path} lacks keys {missing}; the file is corrupt: export again")
    problem = _schema_problem(manifest)
    if problem:
        raise ManifestError(f"{path}: {problem}; the file is corrupt or was edited: export again")
    return manifest


_DTYPES = tuple(NP_DTYPES)
# Weights in the shared data file may also be quantized (milora-quantize): int8 / uint8 data and
# zero points, int32 biases (shared_weights.TABLE_DTYPES lists what a table may name).
_WEIGHT_DTYPES = _DTYPES + ("int8", "uint8")


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_relative(v: Any) -> bool:
    """A relative POSIX path that stays inside the export directory."""
    return isinstance(v, str) and bool(v) and not v.startswith(("/", "\\")) and ":" not in v \
        and ".." not in v.replace("\\", "/").split("/")


def _schema_problem(m: dict[str, Any]) -> str | None:
    """The first way m departs from what milora-export writes (and the runtime reads), or None."""
    base = m["base"]
    if not isinstance(base, dict) or any(not _is_int(base.get(k), 1) for k in
                                         ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                          "intermediate_size", "vocab_size")):
        return f"'base' must map the base model's dimensions to positive integers, got {str(base)[:200]}"
    if base.get("max_position_embeddings") is not None and not _is_int(base["max_position_embeddings"], 1):
        return f"base.max_position_embeddings={base['max_position_embeddings']!r}; expected a positive integer"
    if m["dtype"] not in ("float32", "float16"):
        return f"dtype={m['dtype']!r}; expected float32 or float16"
    if m["flavour"] not in FLAVOURS:
        return f"flavour={m['flavour']!r}; expected one of {', '.join(FLAVOURS)}"
    if not _is_int(m["slots"], 1) or not _is_int(m["max_rank"], 1):
        return f"slots={m['slots']!r}, max_rank={m['max_rank']!r}; expected positive integers"
    if not isinstance(m["experts"], list) or not all(isinstance(e, str) for e in m["experts"]):
        return f"experts={m['experts']!r}; expected a list of module names"
    graphs = m["graphs"]
    if not isinstance(graphs, dict) or not all(isinstance(graphs.get(g), dict) for g in ("prefill", "decode")):
        return "'graphs' must hold 'prefill' and 'decode' objects"
    for g in ("prefill", "decode"):
        spec = graphs[g]
        if not _is_relative(spec.get("file")) or not _is_relative(spec.get("data_file")):
            return f"graphs.{g}: file / data_file must be relative paths inside the directory"
        for side in ("inputs", "outputs"):
            io = spec.get(side)
            if not isinstance(io, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("name"), str) and x.get("dtype") in _DTYPES
                    and isinstance(x.get("shape"), list)
                    and all(_is_int(d) or isinstance(d, str) for d in x["shape"]) for x in io):
                return f"graphs.{g}.{side} must be a list of {{name, shape, dtype}} objects"
        table = spec.get("external_initializers")
        if table is not None and (not isinstance(table, dict) or not all(
                isinstance(t, dict) and _is_int(t.get("offset")) and _is_int(t.get("length"))
                and t.get("dtype") in _WEIGHT_DTYPES and isinstance(t.get("shape"), list)
                and all(_is_int(d) for d in t["shape"]) for t in table.values())):
            return f"graphs.{g}.external_initializers must map names to {{offset, length, dtype, shape}}"
    banks = m["banks"]
    if not isinstance(banks, dict) or not all(
            isinstance(b, dict) and b.get("dtype") in _DTYPES and isinstance(b.get("shape"), list)
            and all(_is_int(d, 1) for d in b["shape"]) for b in banks.values()):
        return "'banks' must map bank names to {shape: [positive ints], dtype}"
    tenants = m["tenants"]
    if not isinstance(tenants, dict):
        return "'tenants' must be an object"
    for name, info in tenants.items():
        if not isinstance(info, dict) or not _is_int(info.get("slot"), 1) or info["slot"] >= m["slots"]:
            return (f"tenant {name!r}: slot {info.get('slot') if isinstance(info, dict) else None!r} is not one of "
                    f"the adapter slots 1..{m['slots'] - 1}")
        if not _is_relative(info.get("pack")):
            return f"tenant {name!r}: pack {info.get('pack')!r} must be a relative path inside the directory"
    files = m["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return "'files' must map relative paths to sha256 strings"
    quant = m.get(QUANTIZATION_KEY)
    if quant is not None and (not isinstance(quant, dict) or quant.get("precision") not in QUANT_PRECISIONS
                              or not isinstance(quant.get("options"), dict)):
        return (f"'{QUANTIZATION_KEY}' must be an object with a precision in {QUANT_PRECISIONS} and its options, "
                f"got {str(quant)[:200]}")
    source = m["source"]
    if not isinstance(source, dict) or not isinstance(source.get("model_dir"), str) \
            or not isinstance(source.get("adapters"), dict) \
            or not all(isinstance(v, str) for v in source["adapters"].values()):
        return "'source' must hold model_dir and adapters (paths)"
    return None


def verify_files(root: str | Path, manifest: dict[str, Any]) -> None:
    """Refuse a directory whose files differ from the manifest (missing, extra or changed)."""
    root = Path(root)
    actual = file_hashes(root)
    expected = manifest["files"]
    problems = [f"{n} is missing" for n in expected if n not in actual]
    problems += [f"{n} is not listed in the manifest" for n in actual if n not in expected]
    problems += [f"{n} changed (sha256 {actual[n][:12]}..., manifest {expected[n][:12]}...)"
                 for n in expected if n in actual and actual[n] != expected[n]]
    if problems:
        raise ManifestError(f"{root} does not match its manifest: {'; '.join(problems)}. "
                            "The directory was modified after export: export it again")
