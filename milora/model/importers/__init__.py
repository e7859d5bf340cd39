"""Importers: turn adapters trained elsewhere into MiLoRA adapters (docs/importing.md).

    config, tensors = import_peft_adapter(base_model, "peft_dir")        # plain LoRA, no router
    config, tensors = import_reference_checkpoint(base_model, "ckpt")    # reference-code MiLoRA
    model = load_peft_adapter(base_model, "peft_dir")                     # -> MiloraModel
    model = load_reference_checkpoint(base_model, "ckpt", top_k=1)       # -> MiloraModel
    convert_to_milora("peft_or_ckpt_dir", "out_dir", base_model)         # -> format-v1 directory
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from milora.errors import AdapterImportError
from milora.model.importers.common import ImportedAdapter, write_adapter
from milora.model.importers.peft_adapter import PEFT_CONFIG_FILE, import_peft_adapter
from milora.model.importers.reference import GATINGS_FILE, MODULES_FILE, import_reference_checkpoint
from milora.model.importers.safe_pickle import load_pickled_modules

__all__ = ["ImportedAdapter", "import_peft_adapter", "import_reference_checkpoint", "load_peft_adapter",
           "load_reference_checkpoint", "convert_to_milora", "detect_source", "load_pickled_modules"]


def _to_model(base_model: nn.Module, adapter: ImportedAdapter, where: str, dtype: torch.dtype | None):
    from milora.model.model import MiloraModel

    model = MiloraModel(base_model, adapter.config, dtype=dtype)
    model.load_adapter_state_dict(adapter.tensors, where=where)
    # Eval mode, as Hugging Face's from_pretrained returns: a fresh nn.Module is in training
    # mode, where an imported noisy gate would add noise to the routing. Call .train() to fine-tune.
    return model.eval()


def load_peft_adapter(base_model: nn.Module, peft_dir: str | Path, dtype: torch.dtype | None = None):
    """Add the PEFT LoRA adapter in `peft_dir` to `base_model` (modified in place) as a
    MiloraModel with no router and gates fixed at 1 on the adapter's modules."""
    return _to_model(base_model, import_peft_adapter(base_model, peft_dir), str(peft_dir), dtype)


def load_reference_checkpoint(base_model: nn.Module, checkpoint_dir: str | Path, *, top_k: int | None = None,
                              alpha: float | None = None, dtype: torch.dtype | None = None):
    """Add a reference-code checkpoint to `base_model` (modified in place) as a routed MiloraModel."""
    adapter = import_reference_checkpoint(base_model, checkpoint_dir, top_k=top_k, alpha=alpha)
    return _to_model(base_model, adapter, str(checkpoint_dir), dtype)


def detect_source(src_dir: str | Path) -> str:
    """"peft" or "reference", from the files in `src_dir`."""
    src_dir = Path(src_dir)
    if (src_dir / PEFT_CONFIG_FILE).is_file():
        return "peft"
    if (src_dir / MODULES_FILE).is_file() or (src_dir / GATINGS_FILE).is_file():
        return "reference"
    raise AdapterImportError(f"{src_dir} holds neither a PEFT adapter ({PEFT_CONFIG_FILE}) nor a reference-code "
                       f"checkpoint ({MODULES_FILE} + {GATINGS_FILE}); nothing to import. Fix: give the directory "
                       "that holds those files")


def convert_to_milora(src_dir: str | Path, out_dir: str | Path, base_model_or_dims: Any, *,
                      top_k: int | None = None, alpha: float | None = None) -> Path:
    """Import a PEFT adapter or a reference-code checkpoint and write it to `out_dir` as a
    format-v1 MiLoRA adapter directory (MiloraModel.from_pretrained reads it). The base model
    is only read for its dimensions, never modified. top_k / alpha apply to reference checkpoints."""
    kind = detect_source(src_dir)
    if kind == "peft":
        if top_k is not None or alpha is not None:
            raise AdapterImportError(f"top_k and alpha apply to reference-code checkpoints only, but {src_dir} is a PEFT "
                               f"adapter (seen top_k={top_k!r}, alpha={alpha!r}; expected neither): it has no router "
                               "and records its own alpha. Fix: drop --top-k and --alpha")
        adapter = import_peft_adapter(base_model_or_dims, src_dir)
    else:
        adapter = import_reference_checkpoint(base_model_or_dims, src_dir, top_k=top_k, alpha=alpha)
    return write_adapter(adapter, out_dir)
