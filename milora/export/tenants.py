"""Finding and reading the tenants of an export.

MODEL_DIR may hold one adapter at its root (tenant "default") and/or adapters/<tenant>/
folders; --adapter NAME=DIR adds more. Each adapter directory is one of:
    MiLoRA format v1   milora_config.json + milora_adapter.safetensors
    PEFT LoRA          adapter_config.json (+ weights)          -> no router, fixed gates
    reference code     lora_modules.bin + lora_gatings.bin      -> routed
Imports go through milora.model.importers; every tenant ends as (MiloraConfig, format-v1
tensors as float32 numpy).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from milora.format.adapter import check_base, read_adapter
from milora.format.contract import ADAPTER_CONFIG_FILE
from milora.errors import ExportError, NonFiniteError
from milora.format.config import MiloraConfig

ADAPTERS_SUBDIR = "adapters"
ROOT_TENANT = "default"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PEFT_MARKER, REFERENCE_MARKERS = "adapter_config.json", ("lora_modules.bin", "lora_gatings.bin")


@dataclass
class Tenant:
    name: str
    kind: str  # milora | peft | reference
    source: Path
    config: MiloraConfig
    tensors: dict[str, np.ndarray]


def adapter_kind(directory: Path) -> str | None:
    if (directory / ADAPTER_CONFIG_FILE).is_file():
        return "milora"
    if (directory / PEFT_MARKER).is_file():
        return "peft"
    if any((directory / m).is_file() for m in REFERENCE_MARKERS):
        return "reference"
    return None


def discover(model_dir: Path, extra: dict[str, Path]) -> dict[str, Path]:
    """name -> adapter directory, in a stable order (root, adapters/ sorted, then --adapter)."""
    found: dict[str, Path] = {}
    if adapter_kind(model_dir):
        found[ROOT_TENANT] = model_dir
    sub = model_dir / ADAPTERS_SUBDIR
    if sub.is_dir():
        for d in sorted(p for p in sub.iterdir() if p.is_dir()):
            found[d.name] = d
    for name, d in extra.items():
        if name in found:
            raise ExportError(f"tenant name {name!r} is given twice (--adapter {name}={d} and {found[name]}); "
                              "choose another name")
        found[name] = d
    for name, d in found.items():
        if not NAME_RE.match(name):
            raise ExportError(f"tenant name {name!r} is not allowed (it names the tenant's file "
                              f"{ADAPTERS_SUBDIR}/<name>.safetensors); expected letters, digits, '_', '.', '-', at most "
                              "64, starting with a letter or digit (no '/' or '..'). Fix: choose a name like 'acme-1'")
        if not d.is_dir():
            raise ExportError(f"adapter directory for tenant {name!r} does not exist: {d}; expected a directory "
                              "holding an adapter. Fix: check the path given with --adapter NAME=DIR")
        if adapter_kind(d) is None:
            raise ExportError(f"{d} (tenant {name!r}) holds no adapter: expected {ADAPTER_CONFIG_FILE} (MiLoRA), "
                              f"{PEFT_MARKER} (PEFT) or {' + '.join(REFERENCE_MARKERS)} (reference code)")
    return found


def _numpy(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tensors.items():
        if hasattr(v, "detach"):
            v = v.detach().float().cpu().numpy()
        out[k] = np.asarray(v, dtype=np.float32)
    return out


def load_tenant(name: str, directory: Path, base: dict[str, Any]) -> Tenant:
    """Read (or import) one adapter; refuse one made for another base."""
    kind = adapter_kind(directory)
    try:
        if kind == "milora":
            config, adapter_base, tensors = read_adapter(directory)
            check_base(adapter_base, base, f"adapter {directory} (tenant {name!r})")
            return Tenant(name, kind, directory, config, _numpy(tensors))
        from milora.model import importers

        if kind == "peft":
            imported = importers.import_peft_adapter(base, directory)
        else:
            imported = importers.import_reference_checkpoint(base, directory)
    except NonFiniteError as exc:
        raise NonFiniteError(f"tenant {name!r}: {exc}", exc.problems) from None
    return Tenant(name, kind, directory, imported.config, _numpy(imported.tensors))


def load_tenants(model_dir: Path, extra: dict[str, Path], base: dict[str, Any]) -> list[Tenant]:
    return [load_tenant(n, d, base) for n, d in discover(model_dir, extra).items()]
