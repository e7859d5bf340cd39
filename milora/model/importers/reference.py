"""Import a checkpoint of the reference code (github qgyd2021/MiLoRA): lora_modules.bin and
lora_gatings.bin, whole pickled modules read safely (safe_pickle), mapped onto MiLoRA.

Reference semantics (docs/method.md; docs/importing.md, "Reference-code checkpoints"), per layer l:
    modules[7 l + j], j = q, k, v, o, gate, up, down:  update = (alpha / r) * module_b(module_a(x))
        module_a.weight [r, d_in], module_b.weight [d_out, r]   (same layout as our lora_A / lora_B)
    gatings[l] on H_l, the hidden states entering layer l, prompt tokens only:
        h = act(H_l)                   activation on every token BEFORE pooling  -> pre_pool
        p = pool(h)                    last | avg | attn (attn_vector: Linear(d, 1))
        z = p @ lora_gate.w_gate       w_gate [d, 7]                             -> router.weight = w_gate^T
        gates = softmax over the top-k of z, 0 elsewhere                         -> gate_mode renormalized
The attention pooler's bias is dropped: adding a constant to every token's score leaves the
softmax over tokens unchanged. Dropout (on the LoRA output and on the router input) only acts
in training and is not carried over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from milora.format.adapter import module_dims
from milora.format.contract import EXPERTS, NUM_EXPERTS, router_tensor_name
from milora.errors import BaseMismatchError, ConfigError, AdapterImportError
from milora.format.finite import check_finite
from milora.format.config import MiloraConfig
from milora.model.importers.common import ImportedAdapter, LoraPair, pack_lora, base_dims
from milora.model.importers.safe_pickle import GlobalRef, PickledModule, load_pickled_modules
from milora.model.router import RATIONAL_INIT

MODULES_FILE = "lora_modules.bin"
GATINGS_FILE = "lora_gatings.bin"
_POOLERS = {"SelfAttnPooler": "attention", "LastPooler": "last", "AdaptiveAvgPool1d": "mean"}
_ACTIVATIONS = {"GELU": "gelu", "ReLU": "relu", "Rational": "rational", "Identity": "identity"}
# format-v1 router tensor -> its name in lora_gatings.bin (for messages), {} = the layer index.
_CHECKPOINT_NAMES = {"weight": "[{}].lora_gate.w_gate", "noise_weight": "[{}].lora_gate.w_noise",
                     "pooler": "[{}].pooler.attn_vector.weight", "act_num": "[{}].intermediate_act_fn.numerator",
                     "act_den": "[{}].intermediate_act_fn.denominator"}


def _child(module: PickledModule, name: str, kind: str, where: str) -> PickledModule:
    child = module.children.get(name)
    if child is None or child.kind != kind:
        seen = None if child is None else child.cls
        raise AdapterImportError(f"{where}.{name}: expected a {kind} module, found {seen}; not a reference-code checkpoint")
    return child


def _tensor(module: PickledModule, name: str, shape: tuple[int, ...], where: str) -> Tensor:
    t = module.tensors.get(name)
    if t is None or tuple(t.shape) != shape:
        seen = None if t is None else list(t.shape)
        raise BaseMismatchError(f"{where}.{name} has shape {seen}, expected {list(shape)} for this base model")
    return t.float()


def _module_list(root: PickledModule, count: int, kind: str, path: Path, what: str) -> list[PickledModule]:
    items = [root.children[k] for k in sorted(root.children, key=int)] if root.kind == "ModuleList" else []
    if root.kind != "ModuleList" or len(items) != count or any(c.kind != kind for c in items):
        kinds = sorted({c.kind for c in items})
        raise BaseMismatchError(
            f"{path}: expected a ModuleList of {count} {kind} ({what}), found {root.kind} of {len(items)} {kinds}. "
            "Fix: import onto the base model the checkpoint was trained on"
        )
    return items


def _gqa_hint(base: dict[str, Any]) -> str:
    if base["num_kv_heads"] != base["num_heads"] or base["num_heads"] * base["head_dim"] != base["hidden_size"]:
        return (f" The reference code sizes the q, k, v, o LoRA outputs as the hidden size (no grouped-query "
                f"attention); this base has {base['num_heads']} heads, {base['num_kv_heads']} KV heads of dim "
                f"{base['head_dim']}, so its k/v projections output {base['num_kv_heads'] * base['head_dim']}, "
                "and reference checkpoints cannot fit it.")
    return ""


def _lora_pairs(root: PickledModule, base: dict[str, Any], alpha: float | None,
                path: Path) -> dict[tuple[int, str], LoraPair]:
    dims = module_dims(base)
    items = _module_list(root, NUM_EXPERTS * base["num_layers"], "LoRAModule", path,
                         f"7 LoRA modules x {base['num_layers']} layers")
    pairs = {}
    for i, item in enumerate(items):
        layer, m = divmod(i, NUM_EXPERTS)
        m = EXPERTS[m]
        where = f"{path.name}[{i}] (layer {layer} {m})"
        a_weight = _child(item, "module_a", "Linear", where).tensors.get("weight")
        b_weight = _child(item, "module_b", "Linear", where).tensors.get("weight")
        d_in, d_out = dims[m]
        if (a_weight is None or b_weight is None or a_weight.dim() != 2 or b_weight.dim() != 2
                or a_weight.shape[1] != d_in or b_weight.shape[0] != d_out or a_weight.shape[0] != b_weight.shape[1]):
            seen = [None if t is None else list(t.shape) for t in (a_weight, b_weight)]
            raise BaseMismatchError(f"{where}: module_a / module_b weights {seen}, expected [r, {d_in}] / "
                                    f"[{d_out}, r] for this base model.{_gqa_hint(base)}")
        pairs[(layer, m)] = LoraPair(a_weight, b_weight, _scale(item, a_weight.shape[0], alpha, where))
    return pairs


def _scale(item: PickledModule, rank: int, alpha: float | None, where: str) -> float:
    """alpha / r as the reference computes it, from the pickled lora_alpha and lora_rank."""
    stored_rank = item.attrs.get("lora_rank", rank)
    if stored_rank != rank:
        raise AdapterImportError(f"{where}: lora_rank attribute {stored_rank} != rank of the weights {rank}")
    stored = item.attrs.get("lora_alpha")
    if stored is None and alpha is None:
        raise AdapterImportError(f"{where} does not record lora_alpha; pass alpha= (the value used in training, "
                           "the reference code's default is 32)")
    if stored is not None and alpha is not None and float(stored) != float(alpha):
        raise AdapterImportError(f"{where} records lora_alpha={stored} but alpha={alpha} was given; drop the argument "
                           "or pass the recorded value")
    return float(stored if stored is not None else alpha) / rank


def _pooler(gating: PickledModule, d: int, where: str) -> tuple[str, Tensor | None]:
    """("attention" | "last" | "mean", attention vector [d] or None)."""
    pooler = gating.children.get("pooler")
    kind = _POOLERS.get(pooler.kind) if pooler is not None else None
    if kind is None:
        raise AdapterImportError(f"{where}.pooler is {None if pooler is None else pooler.cls}; expected one of "
                           f"{list(_POOLERS)} (reference pooler types attn, last, avg)")
    if kind == "last" and pooler.attrs.get("num_prompt_tokens", 1) != 1:
        raise AdapterImportError(f"{where}.pooler is LastPooler({pooler.attrs['num_prompt_tokens']}); only 1 is supported")
    if kind == "mean" and pooler.attrs.get("output_size", 1) not in (1, (1,)):
        raise AdapterImportError(f"{where}.pooler is AdaptiveAvgPool1d({pooler.attrs['output_size']}); only 1 is supported")
    if kind != "attention":
        return kind, None
    linear = _child(pooler, "attn_vector", "Linear", f"{where}.pooler")
    return kind, _tensor(linear, "weight", (1, d), f"{where}.pooler.attn_vector")[0]  # [d]; bias cancels


def _activation(gating: PickledModule, where: str) -> tuple[str, Tensor | None, Tensor | None]:
    """("rational" | "gelu" | "relu" | "identity", numerator [6] or None, denominator [4] or None)."""
    act = gating.children.get("intermediate_act_fn")
    if act is None:
        return "identity", None, None
    kind = _ACTIVATIONS.get(act.kind)
    if kind is None or (kind == "gelu" and act.attrs.get("approximate", "none") != "none"):
        raise AdapterImportError(f"{where}.intermediate_act_fn is {act.cls} {act.attrs.get('approximate', '')}; expected "
                           "exact GELU, ReLU, Rational or none")
    if kind != "rational":
        return kind, None, None
    fn = act.attrs.get("activation_function")
    if isinstance(fn, GlobalRef) and not fn.name.endswith("Rational_PYTORCH_B_F"):
        # Versions A, C, D of the Pade unit have other denominators than 1 + |Q(x)|.
        raise AdapterImportError(f"{where}.intermediate_act_fn uses {fn.name}; only the 'safe' version B "
                           "(Rational_PYTORCH_B_F, R = P / (1 + |Q|)) is supported")
    num = _tensor(act, "numerator", (6,), f"{where}.intermediate_act_fn")
    den = _tensor(act, "denominator", (4,), f"{where}.intermediate_act_fn")
    return kind, num, den


def _nearest_init(num: Tensor, den: Tensor) -> str:
    """Which published initialisation (gelu / relu) the trained coefficients are closest to:
    provenance only, the imported coefficients are used as they are."""
    def dist(kind: str) -> float:
        a, b = RATIONAL_INIT[kind]
        return float((num - torch.tensor(a)).norm() + (den - torch.tensor(b)).norm())
    return min(RATIONAL_INIT, key=dist)


def _the_same(values: list[Any], what: str, path: Path) -> Any:
    if any(v != values[0] for v in values):
        groups: dict[str, list[int]] = {}
        for layer, v in enumerate(values):
            groups.setdefault(str(v), []).append(layer)
        seen = "; ".join(f"{v} in layers {_ranges(layers)}" for v, layers in groups.items())
        raise AdapterImportError(f"{path}: layers differ in {what} ({seen}); expected one {what} for every layer (the MiLoRA "
                           f"adapter format has one per adapter). Fix: retrain the checkpoint with the same {what} "
                           "in every layer")
    return values[0]


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)


def _router(gatings: list[PickledModule], d: int, path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Router options shared by all layers, and the router tensors in format-v1 names."""
    tensors: dict[str, Tensor] = {}
    poolers, acts, ks, noisy = [], [], [], []
    for layer, gating in enumerate(gatings):
        where = f"{path.name}[{layer}]"
        gate = _child(gating, "lora_gate", "LoRAGate", where)
        experts = gate.attrs.get("num_experts", NUM_EXPERTS)
        if experts != NUM_EXPERTS:
            raise AdapterImportError(f"{where}.lora_gate has num_experts={experts}, expected {NUM_EXPERTS}")
        tensors[router_tensor_name(layer, "weight")] = _tensor(gate, "w_gate", (d, NUM_EXPERTS), where).t().contiguous()
        noise = gate.tensors.get("w_noise")
        if noise is not None:
            tensors[router_tensor_name(layer, "noise_weight")] = _tensor(gate, "w_noise", (d, NUM_EXPERTS),
                                                                         where).t().contiguous()
        pooler, vector = _pooler(gating, d, where)
        if vector is not None:
            tensors[router_tensor_name(layer, "pooler")] = vector
        act, num, den = _activation(gating, where)
        if num is not None:
            tensors[router_tensor_name(layer, "act_num")] = num
            tensors[router_tensor_name(layer, "act_den")] = den
        poolers.append(pooler)
        acts.append(act)
        ks.append(gate.attrs.get("k"))
        noisy.append(bool(gate.attrs.get("noisy_gating", False)) and noise is not None)
    options = {"pooler": _the_same(poolers, "pooler type", path), "activation": _the_same(acts, "activation", path),
               "stored_k": _the_same(ks, "top-k", path), "noisy_gating": _the_same(noisy, "noisy gating", path)}
    # Every router tensor the checkpoint holds, noise weights included even when unused.
    check_finite({_CHECKPOINT_NAMES[k.rsplit(".", 1)[1]].format(k.split(".")[1]): v for k, v in tensors.items()},
                 f"reference-code checkpoint {path}")
    if not options["noisy_gating"]:
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".noise_weight")}
    if options["activation"] == "rational":
        options["rational_init"] = _nearest_init(tensors[router_tensor_name(0, "act_num")],
                                                 tensors[router_tensor_name(0, "act_den")])
    return options, tensors


def import_reference_checkpoint(base_model_or_dims: Any, checkpoint_dir: str | Path, *, top_k: int | None = None,
                                alpha: float | None = None) -> ImportedAdapter:
    """Read lora_modules.bin + lora_gatings.bin from `checkpoint_dir` as a routed MiLoRA adapter
    for the given base (a HF model or its base dims), without executing pickled code.

    top_k: experts per layer; default: the k recorded in the checkpoint's gates, else 1.
    alpha: LoRA alpha, needed only when the checkpoint does not record lora_alpha (it must
        agree with the recorded value otherwise).
    Unpack as `config, tensors = import_reference_checkpoint(...)`; `.base` holds the dims.
    Raises UnsafeCheckpointError for pickles that would run code, BaseMismatchError for
    checkpoints of another base (including GQA bases: the reference assumes none)."""
    checkpoint_dir = Path(checkpoint_dir)
    base = base_dims(base_model_or_dims)
    paths = [checkpoint_dir / MODULES_FILE, checkpoint_dir / GATINGS_FILE]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise AdapterImportError(f"{checkpoint_dir} is not a reference-code checkpoint: {missing} missing "
                           f"(expected {MODULES_FILE} and {GATINGS_FILE})")
    modules, gatings = (load_pickled_modules(p) for p in paths)
    pairs = _lora_pairs(modules, base, alpha, paths[0])
    named = {}
    for (l, m), pair in pairs.items():
        i = NUM_EXPERTS * l + EXPERTS.index(m)
        named[f"[{i}].module_a.weight (layer {l} {m})"] = pair.a
        named[f"[{i}].module_b.weight (layer {l} {m})"] = pair.b
    check_finite(named, f"reference-code checkpoint {paths[0]}")
    gates = _module_list(gatings, base["num_layers"], "LoRAGateWithPooling", paths[1], "one gate per layer")
    options, router_tensors = _router(gates, base["hidden_size"], paths[1])
    rank, lora_alpha, folded, tensors = pack_lora(pairs, base["num_layers"], module_dims(base))
    stored_k = options.pop("stored_k")
    k = top_k if top_k is not None else (stored_k if isinstance(stored_k, int) else 1)
    notes = {"imported_from": "reference-code", "source": str(checkpoint_dir), "checkpoint_top_k": stored_k,
             "scales_folded_into_B": folded,
             "why_pre_pool": "the reference code applies the activation to every token before pooling"}
    try:
        config = MiloraConfig(rank=rank, alpha=lora_alpha, top_k=k, target_modules=EXPERTS, routed=True,
                              activation_position="pre_pool", gate_mode="renormalized", lb_loss="cv2",
                              notes=notes, **options)
    except ConfigError as exc:  # e.g. a top_k outside 1..7: say which checkpoint it came from
        raise AdapterImportError(f"{checkpoint_dir}: {exc}") from None
    tensors.update(router_tensors)
    return ImportedAdapter(config, base, tensors)
