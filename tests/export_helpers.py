"""Tiny model directories for the milora-export tests: a saved tiny Llama with MiLoRA tenants
that differ in rank, k, gate mode, pooler, activation and its position, plus a PEFT LoRA."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from helpers import randomize_adapter, tenant, tiny_llama
from milora.format.config import MiloraConfig

TENANTS = {
    "alpha": MiloraConfig(rank=4, alpha=8),  # project defaults: attention pooler, rational, paper, k=1
    "beta": MiloraConfig(rank=2, alpha=4, top_k=2, pooler="last", activation="gelu",
                         activation_position="pre_pool", gate_mode="renormalized"),
    "gamma": MiloraConfig(rank=3, alpha=3, top_k=2, pooler="mean", rational_degrees=(6, 5),
                          activation_position="pre_pool", target_modules=("q_proj", "v_proj", "up_proj", "down_proj")),
    "delta": MiloraConfig(rank=4, alpha=4, top_k=3, pooler="max", activation="relu"),
}


def save_peft(directory: Path, seed: int = 99, base_seed: int = 0) -> Path:
    """A PEFT LoRA adapter (q, v, down; r=3) with non-zero B, saved the PEFT way."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(base_seed), LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0,
                                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(str(directory))
    return directory


def make_model_dir(root: Path, tenants: dict[str, MiloraConfig] | None = None, root_adapter: bool = False,
                   hidden: int = 32) -> Path:
    """root/model: the tiny base (seed 0) with adapters/<name>/ per tenant (seeds 10, 11, ...);
    hidden 64 makes head dim 16 (the fused flavour)."""
    model_dir = root / "model"
    builder = functools.partial(tiny_llama, hidden=hidden)
    builder(0).save_pretrained(str(model_dir))
    for i, (name, cfg) in enumerate((tenants if tenants is not None else TENANTS).items()):
        tenant(10 + i, builder=builder, config=cfg).save_adapter(model_dir / "adapters" / name)
    if root_adapter:
        randomize_adapter(tenant(42, builder=builder, config=MiloraConfig(rank=2, alpha=2)), 42).save_adapter(model_dir)
    return model_dir
