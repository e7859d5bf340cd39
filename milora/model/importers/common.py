"""What every importer shares: the target base's dimensions, folding per-module LoRA scales
into B, and writing the result as a format-v1 adapter directory.

Shape legend: r rank of one module, R largest rank in the adapter, d_in / d_out the input /
output size of a linear (adapter_format.module_dims).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from milora.format.adapter import BASE_KEYS, as_os_error, check_tensors, expected_shapes
from milora.format.contract import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, lora_a_name, lora_b_name
from milora.format.outdir import staged_directory
from milora.errors import AdapterImportError
from milora.format.config import MiloraConfig


@dataclass
class ImportedAdapter:
    """An imported adapter: its config, the base dims it fits, and its format-v1 tensors."""

    config: MiloraConfig
    base: dict[str, Any]
    tensors: dict[str, Tensor]

    def __iter__(self):
        # Lets callers write `config, tensors = import_peft_adapter(...)`.
        return iter((self.config, self.tensors))


@dataclass
class LoraPair:
    """One module's LoRA: a [r, d_in], b [d_out, r], its own scale (alpha / r, or
    alpha / sqrt(r) for rsLoRA)."""

    a: Tensor
    b: Tensor
    scale: float


def base_dims(base_model_or_dims: nn.Module | dict[str, Any]) -> dict[str, Any]:
    """The base dimensions (adapter_format.BASE_KEYS) of a HF model, or a dict that holds them."""
    if isinstance(base_model_or_dims, dict):
        missing = [k for k in BASE_KEYS if k not in base_model_or_dims]
        if missing:
            raise AdapterImportError(
                f"base dims lack {missing}; expected a dict with {list(BASE_KEYS)} "
                "(milora.model.inject.base_info(model) builds one) or the base model itself"
            )
        return dict(base_model_or_dims)
    from milora.model.inject import base_info, decoder_layers

    decoder_layers(base_model_or_dims)  # refuses unsupported layouts with a clear message
    return base_info(base_model_or_dims)


def pack_lora(pairs: dict[tuple[int, str], LoraPair], num_layers: int,
              dims: dict[str, tuple[int, int]]) -> tuple[int, float, bool, dict[str, Tensor]]:
    """Format-v1 LoRA tensors for every layer of the modules that appear in `pairs`.

    If every module has the same rank and scale they are kept as they are (rank r,
    alpha = scale * r), so further training sees the original parametrisation. Otherwise
    each module's scale is folded into its B and ranks are zero-padded to the largest R with
    alpha = R (global scale 1):  x A^T (s B)^T == s x A^T B^T, and zero rows/columns add 0.
    A module missing in some layer (not targeted there) gets zero A and B: no update.
    Returns (rank, alpha, folded, tensors); tensors are float32.
    """
    modules = sorted({m for _, m in pairs})
    ranks = {p.a.shape[0] for p in pairs.values()}
    scales = {p.scale for p in pairs.values()}
    uniform = len(ranks) == 1 and len(scales) == 1
    rank = max(ranks)
    out: dict[str, Tensor] = {}
    for layer in range(num_layers):
        for m in modules:
            d_in, d_out = dims[m]
            a = torch.zeros(rank, d_in, dtype=torch.float32)  # [R, d_in]
            b = torch.zeros(d_out, rank, dtype=torch.float32)  # [d_out, R]
            pair = pairs.get((layer, m))
            if pair is not None:
                r = pair.a.shape[0]
                a[:r] = pair.a.float()
                b[:, :r] = pair.b.float() if uniform else pair.b.float() * pair.scale
            out[lora_a_name(layer, m)] = a
            out[lora_b_name(layer, m)] = b
    alpha = next(iter(scales)) * rank if uniform else float(rank)
    return rank, alpha, not uniform, out


def write_adapter(adapter: ImportedAdapter, out_dir: str | Path) -> Path:
    """Write `adapter` as a format-v1 directory (milora_config.json + milora_adapter.safetensors).

    The files are written to a temporary directory next to `out_dir` and moved into place only
    when complete, so a failure leaves no half-written adapter. An existing non-empty
    `out_dir` is refused rather than overwritten."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AdapterImportError(f"{out_dir} already exists and is not an empty directory; expected a new (or empty) "
                           "output directory. Fix: choose a new output directory")
    check_tensors({k: tuple(v.shape) for k, v in adapter.tensors.items()},
                  expected_shapes(adapter.config, adapter.base), f"imported adapter for {out_dir}")
    with staged_directory(out_dir, "the adapter directory", "write the adapter") as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.tensors.items()}
        try:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "milora", "format_version": "1"})
        except SafetensorError as exc:  # a full disk or a read-only location
            raise as_os_error(exc, tmp / ADAPTER_WEIGHTS_FILE) from None
        config = adapter.config.to_json_dict(adapter.base)
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir

