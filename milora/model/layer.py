"""The routed LoRA linear: one expert of one decoder layer.

    y = base(x) + gate[b] * s * (dropout(x) @ lora_A^T) @ lora_B^T        per row b

x [B, T, d_in], lora_A [r, d_in], lora_B [d_out, r], s = alpha / r, gate [B] from the
current forward's routing (routing.ForwardRouting). For q_proj and k_proj the update is
part of the projection, so it lands before the rotary embedding, as the method requires.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from milora.format.contract import EXPERT_INDEX
from milora.model.routing import current_forward


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class MiloraLinear(nn.Module):
    def __init__(self, base: nn.Linear, layer: int, module: str, rank: int, scale: float, dropout: float,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.layer = layer
        self.module_name = module
        self.expert = EXPERT_INDEX[module]
        self.scale = scale
        dtype = dtype or base.weight.dtype
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: a fresh adapter is a no-op
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        # Some HF code reads `proj.weight.dtype`; expose the base weight.
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # [B, T, d_out]
        gate = current_forward().gate(self.layer, self.expert)  # [B]
        if not _tracing() and not bool(gate.any()):
            return y  # no row uses this expert here: skip the update entirely
        lora_dtype = self.lora_A.dtype
        low = self.dropout(x).to(lora_dtype) @ self.lora_A.t()  # [B, T, r]
        # The gate scales the rank-r activation, not the d_out-wide update: the same product,
        # but autograd then keeps r values per token for the gate's gradient instead of d_out
        # (about a quarter of a training step's activation memory on SmolLM2).
        gate = gate.to(lora_dtype).view(-1, *([1] * (low.dim() - 1)))  # [B, 1, 1]
        update = (low * (gate * self.scale)) @ self.lora_B.t()  # [B, T, d_out]
        return y + update.to(y.dtype)
