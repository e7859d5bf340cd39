"""Slot packs and adapter banks (numpy only: the runtime uses the same code).

A slot pack is one tenant's slice of every bank tensor (manifest.bank_specs), written as
one safetensors file. Banks are the packs stacked along a leading slot axis S; slot 0 is
all zeros (the bare base model: no LoRA, no router, fixed gates 0).

    pack[lora_A.m]  [L, d_in, R]  = A^T zero-padded from r to R
    pack[lora_B.m]  [L, R, d_out] = (alpha / r) * B^T zero-padded   (padding is exact: 0 * 0)
    pack[router.weight] [L, d, 7]  = W_r^T on the tenant's expert columns, 0 elsewhere
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from milora.format.contract import EXPERT_INDEX, lora_a_name, lora_b_name, router_tensor_name
from milora.errors import ExportError, ManifestError
from milora.format import manifest as mf
from milora.format.finite import check_finite
from milora.format.config import MiloraConfig

from milora.format.manifest import NP_DTYPES


def tenant_options(config: MiloraConfig) -> dict[str, int]:
    """The per-slot options row (manifest.OPTION_COLUMNS) of one tenant."""
    return {"pooler": mf.POOLER_CODES[config.pooler], "activation": mf.ACTIVATION_CODES[config.activation],
            "activation_position": mf.POSITION_CODES[config.activation_position],
            "gate_mode": mf.GATE_MODE_CODES[config.gate_mode], "top_k": config.top_k if config.routed else 0,
            "routed": int(config.routed)}


def empty_pack(base: dict[str, Any], max_rank: int, dtype: str) -> dict[str, np.ndarray]:
    specs = mf.bank_specs(base, max_rank, dtype)
    return {n: np.zeros(s["shape"], dtype=NP_DTYPES[s["dtype"]]) for n, s in specs.items()}


def build_pack(config: MiloraConfig, tensors: dict[str, np.ndarray], base: dict[str, Any], max_rank: int,
               dtype: str, where: str = "adapter") -> dict[str, np.ndarray]:
    """One tenant's slot pack from its format-v1 tensors (see the module docstring).
    NonFiniteError if a value overflows on the way (`where` names the tenant)."""
    if config.rank > max_rank:
        raise ExportError(f"tenant rank {config.rank} exceeds the export's max rank {max_rank}")
    pack = _fill_pack(config, tensors, base, max_rank, dtype)
    # Finite inputs can still overflow here: B scaled by alpha / r, or cast to float16 (|x| > 65504).
    check_finite(pack, f"{where} (as a {dtype} slot pack: LoRA B scaled by alpha/r={config.scale:g})",
                 fix="rescale the adapter's weights into range or export with --dtype fp32" if dtype == "float16"
                 else None)
    return pack


@np.errstate(over="ignore")  # an overflow is reported by build_pack's check, with the tensor named
def _fill_pack(config: MiloraConfig, tensors: dict[str, np.ndarray], base: dict[str, Any], max_rank: int,
               dtype: str) -> dict[str, np.ndarray]:
    pack = empty_pack(base, max_rank, dtype)
    r, experts = config.rank, [EXPERT_INDEX[m] for m in config.target_modules]
    for l in range(base["num_layers"]):
        for m in config.target_modules:
            a = np.asarray(tensors[lora_a_name(l, m)], dtype=np.float32)  # [r, d_in]
            b = np.asarray(tensors[lora_b_name(l, m)], dtype=np.float32)  # [d_out, r]
            pack[mf.lora_a_bank(m)][l, :, :r] = a.T
            pack[mf.lora_b_bank(m)][l, :r, :] = config.scale * b.T
        if not config.routed:
            continue
        w = np.asarray(tensors[router_tensor_name(l, "weight")], dtype=np.float32)  # [E, d]
        pack[mf.ROUTER_WEIGHT][l][:, experts] = w.T
        if config.pooler == "attention":
            pack[mf.ROUTER_POOLER][l] = tensors[router_tensor_name(l, "pooler")]
        if config.activation == "rational":
            num = np.asarray(tensors[router_tensor_name(l, "act_num")], dtype=np.float32)
            den = np.asarray(tensors[router_tensor_name(l, "act_den")], dtype=np.float32)
            pack[mf.ROUTER_ACT_NUM][l, : num.shape[0]] = num
            pack[mf.ROUTER_ACT_DEN][l, : den.shape[0]] = den
    pack[mf.SLOT_EXPERT_MASK][experts] = 1.0
    if not config.routed:
        pack[mf.SLOT_FIXED_GATES][experts] = 1.0
    pack[mf.SLOT_OPTIONS][:] = list(tenant_options(config).values())
    return pack


def save_pack(path: Path, pack: dict[str, np.ndarray]) -> None:
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    from milora.format.adapter import as_os_error

    try:
        save_file({k: np.ascontiguousarray(v) for k, v in pack.items()}, str(path),
                  metadata={"format": "milora-pack"})
    except SafetensorError as exc:  # a full disk or a read-only location
        raise as_os_error(exc, path) from None


def load_pack(path: Path, manifest: dict[str, Any], where: str | None = None) -> dict[str, np.ndarray]:
    """Read a slot pack and check every tensor against the manifest's bank table, and that
    every value is finite (NonFiniteError). `where` names the tenant in messages."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    what = f"{where} (slot pack {path})" if where else f"slot pack {path}"
    try:
        pack = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"{what} cannot be read ({exc}); the file is missing or corrupt. Fix: export "
                            "again") from None
    for name, spec in manifest["banks"].items():
        got = pack.get(name)
        if got is None or list(got.shape) != spec["shape"] or got.dtype != NP_DTYPES[spec["dtype"]]:
            seen = None if got is None else (list(got.shape), str(got.dtype))
            raise ManifestError(f"{what}: tensor {name} is {seen}, expected "
                                f"({spec['shape']}, {spec['dtype']}). Fix: export again")
    check_finite(pack, what, fix="export again from a finite adapter (milora-export refuses non-finite ones); "
                                 "do not serve this pack")
    return pack


def assemble_banks(root: str | Path, manifest: dict[str, Any], slot_tenants: list[str | None]) -> dict[str, np.ndarray]:
    """Banks [S, ...] for the slot assignment slot_tenants (index = slot; None = empty).
    slot_tenants[0] must be None: slot 0 is the base model."""
    if slot_tenants and slot_tenants[0] is not None:
        raise ExportError(f"slot 0 is reserved for the base model; got tenant {slot_tenants[0]!r} there")
    banks = {n: np.zeros([len(slot_tenants), *s["shape"]], dtype=NP_DTYPES[s["dtype"]])
             for n, s in manifest["banks"].items()}
    for slot, name in enumerate(slot_tenants):
        if name is None:
            continue
        if name not in manifest["tenants"]:
            raise ExportError(f"unknown tenant {name!r}; this export holds {sorted(manifest['tenants'])}")
        pack = load_pack(Path(root) / manifest["tenants"][name]["pack"], manifest)
        for n in banks:
            banks[n][slot] = pack[n]
    return banks


def default_slots(manifest: dict[str, Any]) -> list[str | None]:
    """The slot assignment recorded at export time (tenant i in slot i + 1)."""
    slots: list[str | None] = [None] * manifest["slots"]
    for name, info in manifest["tenants"].items():
        slots[info["slot"]] = name
    return slots

