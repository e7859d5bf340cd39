"""Adapter format v1 (docs/adapter-format.md): the contract, defined once and read by the
model, the exporter and the runtime. Free of torch: tensors are read with numpy.

A directory with
  milora_config.json          MiloraConfig.to_json_dict(base)
  milora_adapter.safetensors  layers.{l}.{module}.lora_A [r, d_in]
                              layers.{l}.{module}.lora_B [d_out, r]
                              layers.{l}.router.weight   [E, d]      (routed adapters)
                              layers.{l}.router.pooler   [d]         (attention pooler)
                              layers.{l}.router.act_num  [p+1]       (rational activation)
                              layers.{l}.router.act_den  [q]         (rational activation)
                              layers.{l}.router.noise_weight [E, d]  (noisy gating)
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from milora.format.contract import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, lora_a_name, lora_b_name, router_tensor_name
from milora.format.jsonfile import read_json
from milora.errors import AdapterFormatError, BaseMismatchError, ConfigError
from milora.format.finite import check_finite
from milora.format.config import MiloraConfig

BASE_KEYS = ("architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "intermediate_size", "vocab_size")
# Keys whose values must agree between an adapter and the base it is loaded onto.
BASE_DIM_KEYS = BASE_KEYS[1:]
# Hugging Face config names accepted in an adapter's "base" entry, and the key they mean.
HF_BASE_KEYS = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                "num_key_value_heads": "num_kv_heads", "architectures": "architecture"}


def module_dims(base: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each of the 7 linears of a decoder layer."""
    d, hd = base["hidden_size"], base["head_dim"]
    q_out, kv_out, inter = base["num_heads"] * hd, base["num_kv_heads"] * hd, base["intermediate_size"]
    return {
        "q_proj": (d, q_out), "k_proj": (d, kv_out), "v_proj": (d, kv_out), "o_proj": (q_out, d),
        "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d),
    }


def expected_shapes(config: MiloraConfig, base: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor an adapter with this config must hold, with its shape."""
    dims = module_dims(base)
    d, e, r = base["hidden_size"], config.num_experts, config.rank
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(base["num_layers"]):
        for m in config.target_modules:
            d_in, d_out = dims[m]
            shapes[lora_a_name(layer, m)] = (r, d_in)
            shapes[lora_b_name(layer, m)] = (d_out, r)
        if not config.routed:
            continue
        shapes[router_tensor_name(layer, "weight")] = (e, d)
        if config.pooler == "attention":
            shapes[router_tensor_name(layer, "pooler")] = (d,)
        if config.activation == "rational":
            p, q = config.rational_degrees
            shapes[router_tensor_name(layer, "act_num")] = (p + 1,)
            shapes[router_tensor_name(layer, "act_den")] = (q,)
        if config.noisy_gating:
            shapes[router_tensor_name(layer, "noise_weight")] = (e, d)
    return shapes


def check_tensors(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise AdapterFormatError listing every missing, unexpected or mis-shaped tensor."""
    problems = [f"missing tensor {n} (expected shape {list(s)})" for n, s in expected.items() if n not in shapes]
    problems += [f"unexpected tensor {n}" for n in shapes if n not in expected]
    problems += [
        f"tensor {n} has shape {list(shapes[n])}, expected {list(s)}"
        for n, s in expected.items() if n in shapes and tuple(shapes[n]) != tuple(s)
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise AdapterFormatError(f"{where}: {shown}")


def check_base(adapter_base: dict[str, Any], model_base: dict[str, Any], where: str) -> None:
    """Refuse an adapter made for a base with other dimensions, naming every mismatch."""
    diffs = [
        f"{k}: adapter {adapter_base.get(k)!r}, model {model_base.get(k)!r}"
        for k in BASE_DIM_KEYS if adapter_base.get(k) != model_base.get(k)
    ]
    if diffs:
        raise BaseMismatchError(
            f"{where} was made for another base model ({'; '.join(diffs)}); load it onto the base "
            f"it was trained on ({adapter_base.get('architecture', '?')})"
        )


def normalize_base(base: Any, where: str) -> dict[str, Any]:
    """An adapter's "base" entry with Hugging Face key names (num_hidden_layers, ...) mapped to
    ours (HF_BASE_KEYS); head_dim defaults to hidden_size // num_heads as in Hugging Face.
    Refuses a missing key, or an HF name and ours that disagree, naming the key to use."""
    if not isinstance(base, dict):
        raise AdapterFormatError(f"{where}: 'base' is {type(base).__name__}, expected an object with "
                                 f"{list(BASE_KEYS)}. Fix: re-save the adapter with milora")
    out = dict(base)
    for hf, ours in HF_BASE_KEYS.items():
        if hf not in base:
            continue
        value = base[hf]
        if hf == "architectures":
            value = value[0] if isinstance(value, list) and value else value
        if ours in base and base[ours] != value:
            raise AdapterFormatError(
                f"{where}: 'base' holds both {hf}={base[hf]!r} (the Hugging Face name) and {ours}={base[ours]!r}, "
                f"which disagree; expected one value. Fix: keep only {ours!r} with the base model's value")
        out[ours] = value
    if "head_dim" not in out and isinstance(out.get("hidden_size"), int) and isinstance(out.get("num_heads"), int) \
            and out["num_heads"] > 0:
        out["head_dim"] = out["hidden_size"] // out["num_heads"]
    missing = [k for k in BASE_KEYS if k not in out]
    if missing:
        raise AdapterFormatError(f"{where}: 'base' lacks {missing}; expected {list(BASE_KEYS)} (the base model's "
                                 "dimensions). Fix: re-save the adapter with milora, or add the keys")
    bad = [f"{k}={out[k]!r}" for k in BASE_DIM_KEYS
           if not isinstance(out[k], int) or isinstance(out[k], bool) or out[k] < 1]
    if bad or not isinstance(out["architecture"], str):
        bad += [] if isinstance(out["architecture"], str) else [f"architecture={out['architecture']!r}"]
        raise AdapterFormatError(f"{where}: 'base' has invalid values {bad}; expected positive integers (and an "
                                 "architecture name). Fix: re-save the adapter with milora")
    return out


def read_config(adapter_dir: str | Path) -> tuple[MiloraConfig, dict[str, Any]]:
    path = Path(adapter_dir) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(
            f"{adapter_dir} is not a MiLoRA adapter: {ADAPTER_CONFIG_FILE} is missing "
            f"(expected {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE})"
        )
    data = read_json(path, AdapterFormatError, "re-save the adapter", "an adapter config")
    try:
        config = MiloraConfig.from_json_dict(data)
    except ConfigError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from None
    return config, normalize_base(data.get("base"), str(path))


def read_adapter(adapter_dir: str | Path) -> tuple[MiloraConfig, dict[str, Any], dict[str, np.ndarray]]:
    """Read and validate an adapter directory: (config, base dims, tensors as numpy). Every
    tensor must be present with its shape, and finite (NonFiniteError otherwise)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config, base = read_config(adapter_dir)
    path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{adapter_dir}: {ADAPTER_WEIGHTS_FILE} is missing; expected it next to "
                                 f"{ADAPTER_CONFIG_FILE}. Fix: copy the whole adapter directory")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise AdapterFormatError(f"{path} cannot be read as safetensors ({exc}); the file is corrupt. Fix: copy "
                                 "or re-save the adapter") from None
    check_tensors({k: v.shape for k, v in tensors.items()}, expected_shapes(config, base), str(path))
    check_finite(tensors, f"adapter {adapter_dir}")
    return config, base, tensors


def as_os_error(exc: Exception, path: str | Path) -> OSError:
    """The OSError behind a safetensors write failure (safetensors raises SafetensorError with
    "os error N" in its text for a full disk or a read-only location), so writers report it
    like any other failed write."""
    found = re.search(r"os error (\d+)", str(exc))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))
