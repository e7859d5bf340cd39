"""The prefill graph's router: every tenant's router at once, options selected per row as data.

Shape legend: B rows, T prompt tokens, d hidden, E = 7 experts, L layers.

Per layer l and row b (slot s = tenant_slots[b]), float32 whatever the model dtype:

    h      = hidden entering layer l, [T, d]; prompt tokens = mask
    post   = act_s(pool_s(h))      pre = pool_s(act_s(h))      pooled = pre if pre_pool else post
    z      = pooled @ W[s, l]      [E]; experts the tenant lacks -> NEG (never selected)
    sel    = the top_k[s] largest z, lower index first on ties (rank by pairwise comparison)
    gates  = paper:        softmax(z) on sel, 0 elsewhere
             renormalized: softmax(z over sel) on sel, 0 elsewhere
             (a selected gate is at least GATE_FLOOR: gates != 0 is exactly sel)
             not routed:   fixed_gates[s]  (slot 0: all 0; plain LoRA: 1 on its modules)

Every pooler and activation variant is computed for every row and one is selected with
Where: cheap next to a decoder layer, and it keeps options out of the graph structure.
Masked positions are excluded by selection, never by multiplying with a 0/1 mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from milora.format import manifest as mf
from milora.model.router import ACTIVATION_FNS, gates_from_logits, pool_all, rational, select_top_k

# Stands in for -inf on experts a tenant lacks: exp() of it is exactly 0 next to any real
# logit, and an all-NEG row (slot 0, whose gates are replaced) softmaxes to finite values.
NEG = -1.0e30
_COL = {name: i for i, name in enumerate(mf.OPTION_COLUMNS)}


def _per_row(code: Tensor, like: Tensor) -> Tensor:
    """[B] -> broadcastable against like [B, ...]."""
    return code.view(-1, *([1] * (like.dim() - 1)))


def activate(x: Tensor, code: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """Per-row activation (manifest.ACTIVATION_CODES) of x [B, ...]: each of the reference's
    definitions (milora.model.router), one picked per row."""
    c = _per_row(code, x)
    out = x  # identity
    for kind in ("relu", "gelu"):
        out = torch.where(c == mf.ACTIVATION_CODES[kind], ACTIVATION_FNS[kind](x), out)
    return torch.where(c == mf.ACTIVATION_CODES["rational"], rational(x, num, den), out)


def pool(h: Tensor, mask: Tensor, code: Tensor, vec: Tensor) -> Tensor:
    """Per-row pooling (manifest.POOLER_CODES) of h [B, T, d] over mask [B, T] -> [B, d]: every
    pooler of the reference (milora.model.router.pool_all), one picked per row."""
    pooled = pool_all(h, mask, vec)
    c = code[:, None]
    out = pooled["mean"]
    for kind in ("max", "last", "attention"):
        out = torch.where(c == mf.POOLER_CODES[kind], pooled[kind], out)
    return out


def route_layer(hidden: Tensor, mask: Tensor, slots: Tensor, banks: dict[str, Tensor], l: int,
                with_logits: bool = False):
    """Gates [B, E] float32 of layer l for every row (see the module docstring); with_logits:
    (gates, z), z [B, E] the router logits (NEG where the tenant lacks the expert; 0 on rows
    whose tenant is not routed: the base model, plain LoRA)."""
    opts = banks[mf.SLOT_OPTIONS][slots]  # [B, 6]
    col = lambda name: opts[:, _COL[name]]  # noqa: E731
    num, den = banks[mf.ROUTER_ACT_NUM][slots, l], banks[mf.ROUTER_ACT_DEN][slots, l]  # [B, 7], [B, 5]
    vec = banks[mf.ROUTER_POOLER][slots, l]  # [B, d]
    # Masked positions hold anything (padding); select 0 there first, as the reference does.
    h = torch.where(mask[..., None], hidden.float(), 0.0)  # [B, T, d]
    act, pooler = col("activation"), col("pooler")
    post = activate(pool(h, mask, pooler, vec), act, num, den)  # [B, d]
    pre = pool(activate(h, act, num, den), mask, pooler, vec)  # [B, d]
    pooled = torch.where(col("activation_position")[:, None] == mf.POSITION_CODES["pre_pool"], pre, post)
    z = (pooled[:, None, :] @ banks[mf.ROUTER_WEIGHT][slots, l])[:, 0]  # [B, E]
    z = torch.where(banks[mf.SLOT_EXPERT_MASK][slots] > 0.5, z, NEG)
    sel = select_top_k(z, col("top_k"))  # [B, E]
    paper = gates_from_logits(z, sel, "paper")
    renorm = gates_from_logits(z, sel, "renormalized", masked=NEG)
    gates = torch.where(col("gate_mode")[:, None] == mf.GATE_MODE_CODES["renormalized"], renorm, paper)
    gates = torch.where(col("routed")[:, None] == 1, gates, banks[mf.SLOT_FIXED_GATES][slots])  # [B, E]
    if not with_logits:
        return gates
    return gates, torch.where(col("routed")[:, None] == 1, z, torch.zeros_like(z))  # 0 for rows not routed
