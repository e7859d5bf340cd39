"""The MiLoRA router: pool the prompt's hidden states, activate, project to expert logits,
pick the top-k experts and their gates (docs/method.md, "The router").

Shape legend: B batch rows, T tokens, d hidden size, E experts of this adapter (<= 7),
k experts switched on per layer.

Everything here runs in float32 whatever the model's dtype: the router reads the
un-normalised residual stream and the rational activation's high powers overflow fp16.
Masked positions may hold any value (padding, response tokens, even inf): they are
excluded by selection (torch.where / -inf), never by multiplying with a 0/1 mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milora.format.contract import GATE_FLOOR
from milora.errors import RoutingError
from milora.format.config import MiloraConfig

# "Safe" Pade unit initialisations of the reference code, degrees (5, 4):
# R(x) = (a0 + a1 x + ... + a5 x^5) / (1 + |b1 x + b2 x^2 + b3 x^3 + b4 x^4|).
RATIONAL_INIT = {
    "gelu": (
        (-4.2211e-4, 0.49999956, 0.40270535, 0.07366977, -0.01295479, -0.00374140),
        (4.9585e-5, 0.14729774, 1.1646e-5, -0.00748387),
    ),
    "relu": (
        (0.03389713, 0.49999854, 1.67013636, 1.99010216, 0.94130896, 0.15091334),
        (-2.1040e-5, 3.98024785, -3.1663e-5, 0.30183382),
    ),
}


def rational_init(kind: str, degrees: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Coefficients (numerator [p+1], denominator [q]) for degrees (p, q). The published fits
    are for (5, 4); (6, 5) starts from the same function with the extra coefficients at 0."""
    num, den = RATIONAL_INIT[kind]
    p, q = degrees
    a = torch.zeros(p + 1, dtype=torch.float32)
    b = torch.zeros(q, dtype=torch.float32)
    a[: len(num)] = torch.tensor(num[: p + 1])
    b[: len(den)] = torch.tensor(den[:q])
    return a, b


def _coef(c: Tensor, like: Tensor) -> Tensor:
    """One coefficient: a scalar, or one per row [B] broadcast against like [B, ...]."""
    return c.view(-1, *([1] * (like.dim() - 1))) if c.dim() == 1 else c


def rational(x: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """R(x) = P(x) / (1 + |Q(x)|), P(x) = sum_i num[..., i] x^i, Q(x) = sum_j den[..., j-1] x^j (j >= 1).
    Elementwise by Horner's rule in the dtype of x. Coefficients are [p+1] / [q], or per row
    [B, p+1] / [B, q] for x [B, ...] (the export's banks: zero-padded high coefficients leave
    finite values exactly unchanged)."""
    p = torch.zeros_like(x) + _coef(num[..., -1], x)
    for i in range(num.shape[-1] - 2, -1, -1):
        p = p * x + _coef(num[..., i], x)
    q = torch.zeros_like(x) + _coef(den[..., -1], x)
    for j in range(den.shape[-1] - 2, -1, -1):
        q = q * x + _coef(den[..., j], x)
    return p / (1.0 + (q * x).abs())  # Q has no constant term


# The elementwise activations (ACTIVATIONS of config.py); rational takes its coefficients.
ACTIVATION_FNS = {"gelu": F.gelu, "relu": F.relu, "identity": lambda x: x}


def activate(x: Tensor, kind: str, num: Tensor | None = None, den: Tensor | None = None) -> Tensor:
    if kind == "rational":
        if num is None or den is None:
            raise RoutingError("the rational activation needs its coefficients (act_num, act_den)")
        return rational(x, num, den)
    return ACTIVATION_FNS[kind](x)


def pool_all(h: Tensor, mask: Tensor, attn_vector: Tensor | None) -> dict[str, Tensor]:
    """Every pooling of the masked tokens of each row: h [B, T, d], mask [B, T] bool ->
    {kind: [B, d]}. attn_vector [d] or per row [B, d] (None: no attention pooling).

    attention: a = softmax_t(h_t . w) over masked tokens, pooled = sum_t a_t h_t
    last:      h at the last masked position of the row
    mean:      sum of masked h / number of masked tokens
    max:       elementwise max over masked tokens
    Masked-out positions are excluded by selection (-inf / 0 / index), never by a 0/1 product.
    """
    valid = mask[..., None]  # [B, T, 1]
    out = {}
    if attn_vector is not None:
        scores = torch.where(mask, (h * attn_vector[..., None, :]).sum(-1), float("-inf"))  # [B, T]
        weights = torch.softmax(scores, dim=-1)  # [B, T]
        out["attention"] = torch.where(valid, weights[..., None] * h, 0.0).sum(dim=1)  # [B, d]
    t = torch.arange(mask.shape[1], device=mask.device)[None, :]  # [1, T]
    last = torch.where(mask, t, -1).amax(dim=1)  # [B]
    out["last"] = torch.gather(h, 1, last[:, None, None].expand(-1, 1, h.shape[2]))[:, 0]  # [B, d]
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(h.dtype)  # [B, 1]
    out["mean"] = torch.where(valid, h, 0.0).sum(dim=1) / count  # [B, d]
    out["max"] = torch.where(valid, h, float("-inf")).amax(dim=1)  # [B, d]
    return out


def pool(h: Tensor, mask: Tensor, kind: str, attn_vector: Tensor | None = None) -> Tensor:
    """Pool the masked tokens of each row with one pooler (pool_all's definitions)."""
    if kind == "attention" and attn_vector is None:
        raise RoutingError("the attention pooler needs its vector (router.pooler)")
    return pool_all(h, mask, attn_vector if kind == "attention" else None)[kind]


def select_top_k(z: Tensor, k: Tensor | int) -> Tensor:
    """[B, E] logits, k (an int or [B]) -> [B, E] bool: the k largest, the lower index first
    on equal values (what ONNX TopK and a stable descending sort give). By pairwise rank, so
    the same definition traces into the graph with a per-row k:
        rank_j = #{i: z_i > z_j} + #{i < j: z_i == z_j};  selected = rank < k."""
    e = z.shape[-1]
    zi, zj = z[:, :, None], z[:, None, :]  # [B, E, 1], [B, 1, E]
    lower = torch.ones(e, e, dtype=torch.bool, device=z.device).triu(1)  # i < j
    beats = (zi > zj) | ((zi == zj) & lower)  # [B, E(i), E(j)]
    rank = beats.to(torch.int64).sum(dim=1)  # [B, E]
    return rank < (k[:, None] if isinstance(k, Tensor) else k)


def gates_from_logits(z: Tensor, selected: Tensor, mode: str, masked: float = float("-inf")) -> Tensor:
    """Gates [B, E] of the selected experts (docs: gate modes):
    paper:        softmax(z) on the selected experts, 0 elsewhere
    renormalized: softmax over the selected logits only, 0 elsewhere
    A selected gate is at least GATE_FLOOR (contract.py): gates != 0 is exactly the selection.
    `masked` stands in for -inf when building graphs (a finite value keeps all-masked rows finite)."""
    if mode == "paper":
        gates = torch.softmax(z, dim=-1)
    else:
        gates = torch.softmax(torch.where(selected, z, masked), dim=-1)
    return floor_selected(gates, selected)


def top_k_gates(logits: Tensor, k: int, mode: str) -> tuple[Tensor, Tensor]:
    """logits [B, E] -> (gates [B, E], probs [B, E]): select_top_k, then gates_from_logits;
    probs = softmax(logits) over all E (what the load-balancing losses read)."""
    return gates_from_logits(logits, select_top_k(logits, k), mode), torch.softmax(logits, dim=-1)


def floor_selected(gates: Tensor, selected: Tensor) -> Tensor:
    """gates on the selected experts, raised to GATE_FLOOR where they underflowed; 0 elsewhere.
    NaN stays NaN (a corrupt router must show, never pass as "off")."""
    return torch.where(selected, torch.where(gates < GATE_FLOOR, GATE_FLOOR, gates), 0.0)


class MiloraRouter(nn.Module):
    """One layer's router. Parameters (names as in the adapter format):
    weight [E, d]; pooler [d] (attention pooler); act_num [p+1] / act_den [q] (rational);
    noise_weight [E, d] (noisy gating)."""

    def __init__(self, hidden_size: int, config: MiloraConfig):
        super().__init__()
        self.config = config
        e = config.num_experts
        self.weight = nn.Parameter(torch.empty(e, hidden_size, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        # Zero attention vector: the attention pooler starts as a mean over prompt tokens.
        self.pooler = (
            nn.Parameter(torch.zeros(hidden_size, dtype=torch.float32)) if config.pooler == "attention" else None
        )
        if config.activation == "rational":
            a, b = rational_init(config.rational_init, config.rational_degrees)
            self.act_num, self.act_den = nn.Parameter(a), nn.Parameter(b)
        else:
            self.act_num = self.act_den = None
        self.noise_weight = (
            nn.Parameter(torch.zeros(e, hidden_size, dtype=torch.float32)) if config.noisy_gating else None
        )

    def _apply(self, fn, recurse=True):
        # model.half() / model.to(torch.bfloat16) must not demote the router: it runs in float32
        # whatever the model's dtype (docs/method.md, "The router"). Device moves still apply.
        super()._apply(fn, recurse)
        for p in self.parameters(recurse=False):
            if p.dtype != torch.float32:
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()
        return self

    def forward(self, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden [B, T, d] (any dtype), mask [B, T] bool (the prompt tokens) ->
        (gates [B, E], probs [B, E], logits [B, E]), all float32."""
        if not bool(mask.any(dim=1).all()):
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            raise RoutingError(
                f"rows {empty} have no prompt token in the routing mask; every row needs at "
                "least one (check attention_mask / routing_mask)"
            )
        cfg = self.config
        # Select, up front, 0 in place of masked positions: the forward excludes them in pool()
        # anyway, but inf/nan left there would reach the backward (0 * inf = nan in the grads of
        # the pooler and rational coefficients). pool() still masks: R(0) != 0 in pre_pool mode.
        h = torch.where(mask[..., None], hidden.float(), 0.0)  # [B, T, d]
        if cfg.activation_position == "pre_pool":
            h = activate(h, cfg.activation, self.act_num, self.act_den)  # masked inside pool
            pooled = pool(h, mask, cfg.pooler, self.pooler)  # [B, d]
        else:
            pooled = activate(pool(h, mask, cfg.pooler, self.pooler), cfg.activation, self.act_num, self.act_den)
        logits = pooled @ self.weight.t()  # [B, E]
        if self.training and self.noise_weight is not None:
            noise_std = F.softplus(pooled @ self.noise_weight.t())  # [B, E]
            logits = logits + torch.randn_like(logits) * noise_std
        gates, probs = top_k_gates(logits, cfg.top_k, cfg.gate_mode)
        return gates, probs, logits
