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
import torch.nn.functional as F
from torch import Tensor

from milora.contract import NUM_EXPERTS
from milora.export import manifest as mf
from milora.model.router import floor_selected

# Stands in for -inf on experts a tenant lacks: exp() of it is exactly 0 next to any real
# logit, and an all-NEG row (slot 0, whose gates are replaced) softmaxes to finite values.
NEG = -1.0e30
_COL = {name: i for i, name in enumerate(mf.OPTION_COLUMNS)}


def _per_row(code: Tensor, like: Tensor) -> Tensor:
    """[B] -> broadcastable against like [B, ...]."""
    return code.view(-1, *([1] * (like.dim() - 1)))


def rational(x: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """R(x) = P(x) / (1 + |x Q'(x)|) by Horner's rule; num [B, 7], den [B, 5] per row
    (zero-padded high coefficients leave the value exactly unchanged)."""
    num, den = _per_row_coeffs(num, x), _per_row_coeffs(den, x)
    p = torch.zeros_like(x) + num[-1]
    for c in reversed(num[:-1]):
        p = p * x + c
    q = torch.zeros_like(x) + den[-1]
    for c in reversed(den[:-1]):
        q = q * x + c
    return p / (1.0 + (q * x).abs())


def _per_row_coeffs(coeffs: Tensor, like: Tensor) -> list[Tensor]:
    return [_per_row(coeffs[:, i], like) for i in range(coeffs.shape[1])]


def activate(x: Tensor, code: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """Per-row activation (manifest.ACTIVATION_CODES) of x [B, ...]."""
    c = _per_row(code, x)
    out = torch.where(c == mf.ACTIVATION_CODES["relu"], F.relu(x), x)
    out = torch.where(c == mf.ACTIVATION_CODES["gelu"], F.gelu(x), out)
    return torch.where(c == mf.ACTIVATION_CODES["rational"], rational(x, num, den), out)


def pool(h: Tensor, mask: Tensor, code: Tensor, vec: Tensor) -> Tensor:
    """Per-row pooling (manifest.POOLER_CODES) of h [B, T, d] over mask [B, T] -> [B, d]."""
    valid = mask[..., None]  # [B, T, 1]
    scores = torch.where(mask, (h * vec[:, None, :]).sum(-1), float("-inf"))  # [B, T]
    weights = torch.softmax(scores, dim=-1)
    attention = torch.where(valid, weights[..., None] * h, 0.0).sum(dim=1)  # [B, d]
    t = torch.arange(mask.shape[1], device=mask.device)[None, :]  # [1, T]
    last_idx = torch.where(mask, t, -1).amax(dim=1)  # [B]
    last = torch.gather(h, 1, last_idx[:, None, None].expand(-1, 1, h.shape[2]))[:, 0]  # [B, d]
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(h.dtype)  # [B, 1]
    mean = torch.where(valid, h, 0.0).sum(dim=1) / count
    mx = torch.where(valid, h, float("-inf")).amax(dim=1)
    c = code[:, None]
    out = torch.where(c == mf.POOLER_CODES["max"], mx, mean)
    out = torch.where(c == mf.POOLER_CODES["last"], last, out)
    return torch.where(c == mf.POOLER_CODES["attention"], attention, out)


def select_top_k(z: Tensor, k: Tensor) -> Tensor:
    """[B, E] logits, [B] k -> [B, E] bool: the k largest, lower index first on equal values.
    rank_j = #{i: z_i > z_j} + #{i < j: z_i == z_j}; selected = rank < k."""
    zi, zj = z[:, :, None], z[:, None, :]  # [B, E, 1], [B, 1, E]
    lower = torch.ones(NUM_EXPERTS, NUM_EXPERTS, dtype=torch.bool, device=z.device).triu(1)  # i < j
    beats = (zi > zj) | ((zi == zj) & lower)  # [B, E(i), E(j)]
    rank = beats.to(torch.int64).sum(dim=1)  # [B, E]
    return rank < k[:, None]


def route_layer(hidden: Tensor, mask: Tensor, slots: Tensor, banks: dict[str, Tensor], l: int) -> Tensor:
    """Gates [B, E] float32 of layer l for every row (see the module docstring)."""
    opts = banks[mf.SLOT_OPTIONS][slots]  # [B, 6]
    col = lambda name: opts[:, _COL[name]]  # noqa: E731
    num, den = banks[mf.ROUTER_ACT_NUM][slots, l], banks[mf.ROUTER_ACT_DEN][slots, l]  # [B, 7], [B, 5]
    vec = banks[mf.ROUTER_POOLER][slots, l]  # [B, d]
    h = hidden.float()  # [B, T, d]
    act, pooler = col("activation"), col("pooler")
    post = activate(pool(h, mask, pooler, vec), act, num, den)  # [B, d]
    pre = pool(activate(h, act, num, den), mask, pooler, vec)  # [B, d]
    pooled = torch.where(col("activation_position")[:, None] == mf.POSITION_CODES["pre_pool"], pre, post)
    z = (pooled[:, None, :] @ banks[mf.ROUTER_WEIGHT][slots, l])[:, 0]  # [B, E]
    z = torch.where(banks[mf.SLOT_EXPERT_MASK][slots] > 0.5, z, NEG)
    sel = select_top_k(z, col("top_k"))  # [B, E]
    paper = floor_selected(torch.softmax(z, dim=-1), sel)
    renorm = floor_selected(torch.softmax(torch.where(sel, z, NEG), dim=-1), sel)
    gates = torch.where(col("gate_mode")[:, None] == mf.GATE_MODE_CODES["renormalized"], renorm, paper)
    return torch.where(col("routed")[:, None] == 1, gates, banks[mf.SLOT_FIXED_GATES][slots])  # [B, E]
