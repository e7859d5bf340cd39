"""Import a plain PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) as a
MiLoRA tenant with no router: fixed gates of 1 on every module it targets.

PEFT's update for one module is  y = W x + s * B (A dropout(x)),  s = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora), where r and lora_alpha may differ per module
through rank_pattern / alpha_pattern. Ranks are read from the tensors themselves; alphas
follow PEFT's pattern rule (the first pattern key that matches the end of the module's
dotted name). Anything that changes that formula (DoRA, bias terms, extra trained modules,
initialisations that rewrote the base weights, ...) is refused, never approximated.

PEFT does not read this package; only its file format is.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from milora.format.adapter import module_dims
from milora.format.contract import EXPERT_PARENT, EXPERTS
from milora.format.jsonfile import read_json
from milora.errors import BaseMismatchError, AdapterImportError
from milora.format.finite import check_finite
from milora.format.config import MiloraConfig
from milora.model.importers.common import ImportedAdapter, LoraPair, pack_lora, base_dims

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PICKLE_FILE = "adapter_model.bin"

# base_model.model.model.layers.{l}.{self_attn|mlp}.{module}.lora_{A|B}.weight
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

# Config fields that change the maths of the adapter or the model it applies to:
# (field, why it cannot be imported, what to do instead).
_REFUSED_FEATURES = (
    ("use_dora", "DoRA rescales the whole weight by a learned magnitude, not a low-rank update",
     "merge it into the base (peft merge_and_unload) or retrain with plain LoRA"),
    ("lora_bias", "it trains a bias on lora_B", "retrain with lora_bias=False"),
    ("modules_to_save", "it trains full copies of other modules", "retrain without modules_to_save"),
    ("trainable_token_indices", "it trains embedding rows", "retrain without trainable_token_indices"),
    ("target_parameters", "it adapts raw parameters, not linears", "target the 7 linears"),
    ("layer_replication", "it changes the base model's layer stack", "retrain without layer_replication"),
    ("alora_invocation_tokens", "activated LoRA switches on only after invocation tokens",
     "retrain as plain LoRA"),
    ("use_qalora", "QA-LoRA pools inputs for a quantized base", "retrain as plain LoRA"),
    ("use_bdlora", "block-diagonal LoRA has another weight layout", "retrain as plain LoRA"),
    ("arrow_config", "Arrow routes between several LoRAs per token", "import each LoRA on its own"),
    ("kasa_config", "it is not a plain low-rank update", "retrain as plain LoRA"),
    ("monteclora_config", "it is not a plain low-rank update", "retrain as plain LoRA"),
    ("velora_config", "it is not a plain low-rank update", "retrain as plain LoRA"),
    ("fan_in_fan_out", "its weights are stored transposed (Conv1D models)", "use a LLaMA-family base"),
)
# Initialisations that also rewrite the base weights: the adapter only fits that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _refuse(path: Path, what: str, seen: Any, expected: str, fix: str) -> AdapterImportError:
    return AdapterImportError(f"cannot import PEFT adapter {path}: {what} (seen {seen!r}; expected {expected}). Fix: {fix}")


def read_peft_config(peft_dir: str | Path) -> dict[str, Any]:
    path = Path(peft_dir) / PEFT_CONFIG_FILE
    if not path.is_file():
        raise AdapterImportError(f"{peft_dir} is not a PEFT adapter: {PEFT_CONFIG_FILE} is missing")
    return read_json(path, AdapterImportError, "save the adapter again with PEFT's save_pretrained",
                     "a PEFT adapter config")


def check_peft_config(cfg: dict[str, Any], path: Path) -> None:
    """Refuse every PEFT option whose maths a fixed-gate LoRA tenant cannot reproduce."""
    if cfg.get("peft_type") != "LORA":
        raise _refuse(path, "only LoRA adapters can be imported", cfg.get("peft_type"), "peft_type 'LORA'",
                      "train a LoRA adapter (peft.LoraConfig)")
    if cfg.get("bias", "none") != "none":
        raise _refuse(path, "the adapter trains biases of the base model", cfg.get("bias"), "bias 'none'",
                      "retrain with bias='none' (milora never changes base weights)")
    for name, why, fix in _REFUSED_FEATURES:
        if cfg.get(name):
            raise _refuse(path, f"{name} is set: {why}", cfg[name], f"{name} unset", fix)
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise _refuse(path, f"init_lora_weights={init!r} rewrote the base weights when training started",
                      init, "a LoRA trained on the unchanged base",
                      "convert it to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        # PEFT matches a target on the end of a module's dotted name ("mlp.down_proj" is fine).
        outside = sorted(t for t in targets if str(t).rsplit(".", 1)[-1] not in EXPERTS)
        if outside:
            raise _refuse(path, "target_modules includes modules outside the 7 MiLoRA experts", outside,
                          f"a subset of {list(EXPERTS)}", "retrain targeting only those linears")


def _read_tensors(peft_dir: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = peft_dir / PEFT_WEIGHTS_FILE
    if not path.is_file():
        if (peft_dir / PEFT_PICKLE_FILE).is_file():
            raise AdapterImportError(
                f"{peft_dir} holds only {PEFT_PICKLE_FILE}, a pickle file, which milora does not open "
                f"(unpickling can run code); expected {PEFT_WEIGHTS_FILE}. Fix: where you trust the file, "
                "load it with peft and save it again with save_pretrained(safe_serialization=True)"
            )
        raise AdapterImportError(f"{peft_dir}: {PEFT_WEIGHTS_FILE} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise AdapterImportError(f"{path} cannot be read as safetensors ({exc}); the file is corrupt. Fix: copy the "
                           "adapter again, or re-save it with peft's save_pretrained") from None


def pattern_value(patterns: dict[str, Any], module_key: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern rule: the first key K (in file order) for which
    `module_key` matches the regex (.*\\.)?(K)$ gives the value; otherwise `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_key):
            return value
    return default


def _module_scale(cfg: dict[str, Any], module_key: str, rank: int) -> float:
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module_key, cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _group_tensors(tensors: dict[str, Tensor], path: Path) -> dict[tuple[int, str], dict[str, Tensor]]:
    """{(layer, module): {"A": [r, d_in], "B": [d_out, r]}}, refusing keys of anything else."""
    groups: dict[tuple[int, str], dict[str, Tensor]] = {}
    foreign = []
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None or match.group(3) not in EXPERTS or EXPERT_PARENT[match.group(3)] != match.group(2):
            foreign.append(key)
            continue
        layer, module, which = int(match.group(1)), match.group(3), match.group(4)
        groups.setdefault((layer, module), {})[which] = value
    if foreign:
        shown = foreign[:5] + ([f"... {len(foreign) - 5} more"] if len(foreign) > 5 else [])
        raise _refuse(path, "the adapter holds tensors other than LoRA A/B of the 7 decoder linears", shown,
                      f"only model.layers.N.<self_attn|mlp>.<{'|'.join(EXPERTS)}>.lora_A/B.weight",
                      "retrain targeting only those linears (no embeddings, lm_head, DoRA or biases)")
    incomplete = [f"layers.{l}.{m}" for (l, m), g in groups.items() if set(g) != {"A", "B"}]
    if incomplete:
        raise AdapterImportError(f"{path}: LoRA modules {incomplete} lack lora_A or lora_B; the file is incomplete")
    if not groups:
        raise AdapterImportError(f"{path} holds no LoRA tensors; expected lora_A/lora_B weights of decoder linears")
    return groups


def _check_fits_base(groups: dict[tuple[int, str], dict[str, Tensor]], base: dict[str, Any], path: Path) -> None:
    dims = module_dims(base)
    problems = []
    for (layer, m), g in sorted(groups.items()):
        d_in, d_out = dims[m]
        if layer >= base["num_layers"]:
            problems.append(f"layer {layer} exists (model has {base['num_layers']} layers)")
        if g["A"].dim() != 2 or g["B"].dim() != 2 or g["A"].shape[1] != d_in or g["B"].shape[0] != d_out:
            problems.append(f"layers.{layer}.{m}: lora_A {list(g['A'].shape)} / lora_B {list(g['B'].shape)}, "
                            f"expected [r, {d_in}] / [{d_out}, r]")
        elif g["A"].shape[0] != g["B"].shape[1]:
            problems.append(f"layers.{layer}.{m}: rank of lora_A {g['A'].shape[0]} != rank of lora_B "
                            f"{g['B'].shape[1]}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise BaseMismatchError(
            f"PEFT adapter {path} does not fit this base model ({base['architecture']}, hidden "
            f"{base['hidden_size']}, {base['num_layers']} layers): {shown}. Fix: load it onto the base model it "
            "was trained on"
        )


def import_peft_adapter(base_model_or_dims: Any, peft_dir: str | Path) -> ImportedAdapter:
    """Read the PEFT LoRA adapter in `peft_dir` as a non-routed MiLoRA adapter for the given
    base (a HF model or its base dims). Unpack as `config, tensors = import_peft_adapter(...)`;
    the result also carries `.base`. Raises AdapterImportError for adapters whose maths differs
    from plain LoRA and BaseMismatchError for adapters made for another base."""
    peft_dir = Path(peft_dir)
    base = base_dims(base_model_or_dims)
    cfg = read_peft_config(peft_dir)
    check_peft_config(cfg, peft_dir / PEFT_CONFIG_FILE)
    raw = _read_tensors(peft_dir)
    check_finite(raw, f"PEFT adapter {peft_dir / PEFT_WEIGHTS_FILE}",
                 fix="retrain the adapter (or take an earlier checkpoint) from a run whose loss stayed finite")
    groups = _group_tensors(raw, peft_dir / PEFT_WEIGHTS_FILE)
    _check_fits_base(groups, base, peft_dir)
    pairs: dict[tuple[int, str], LoraPair] = {}
    for (layer, m), g in groups.items():
        key = f"model.layers.{layer}.{EXPERT_PARENT[m]}.{m}"
        rank = g["A"].shape[0]
        declared = pattern_value(cfg.get("rank_pattern") or {}, key, cfg.get("r", rank))
        if declared != rank:
            raise AdapterImportError(
                f"{peft_dir}: {key} has rank {rank} in the weights but {declared} in {PEFT_CONFIG_FILE} "
                "(r / rank_pattern); the files do not belong together"
            )
        pairs[(layer, m)] = LoraPair(g["A"], g["B"], _module_scale(cfg, key, rank))
    rank, alpha, folded, tensors = pack_lora(pairs, base["num_layers"], module_dims(base))
    notes = {
        "imported_from": "peft", "source": str(peft_dir),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "peft_r": cfg.get("r"), "peft_lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
        "scales_folded_into_B": folded,
    }
    config = MiloraConfig(rank=rank, alpha=alpha, top_k=1, target_modules=tuple(sorted({m for _, m in pairs})),
                          routed=False, dropout=float(cfg.get("lora_dropout") or 0.0), notes=notes)
    return ImportedAdapter(config, base, tensors)
