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

from milora.errors import RoutingError
from milora.model.config import MiloraConfig

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


def rational(x: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """R(x) = P(x) / (1 + |Q(x)|), P(x) = sum_i num[i] x^i, Q(x) = sum_j den[j-1] x^j (j >= 1).
    Elementwise, evaluated by Horner's rule in the dtype of x."""
    p = torch.zeros_like(x) + num[-1]
    for c in num.flip(0)[1:]:
        p = p * x + c
    q = torch.zeros_like(x) + den[-1]
    for c in den.flip(0)[1:]:
        q = q * x + c
    q = q * x  # Q has no constant term
    return p / (1.0 + q.abs())


def activate(x: Tensor, kind: str, num: Tensor | None = None, den: Tensor | None = None) -> Tensor:
    if kind == "rational":
        assert num is not None and den is not None  # guaranteed by MiloraRouter's construction
        return rational(x, num, den)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "relu":
        return F.relu(x)
    return x  # identity


def pool(h: Tensor, mask: Tensor, kind: str, attn_vector: Tensor | None = None) -> Tensor:
    """Pool the masked tokens of each row: h [B, T, d], mask [B, T] bool -> [B, d].

    attention: a = softmax_t(h_t . w) over masked tokens, pooled = sum_t a_t h_t
    last:      h at the last masked position of the row
    mean:      sum of masked h / number of masked tokens
    max:       elementwise max over masked tokens
    """
    valid = mask[..., None]  # [B, T, 1]
    if kind == "attention":
        assert attn_vector is not None
        scores = torch.where(mask, h @ attn_vector, float("-inf"))  # [B, T]
        weights = torch.softmax(scores, dim=-1)  # [B, T]
        return torch.where(valid, weights[..., None] * h, 0.0).sum(dim=1)  # [B, d]
    if kind == "last":
        t = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
        last = torch.where(mask, t, -1).amax(dim=1)  # [B]
        return h[torch.arange(h.shape[0], device=h.device), last]  # [B, d]
    if kind == "mean":
        count = mask.sum(dim=1, keepdim=True).to(h.dtype)  # [B, 1]
        return torch.where(valid, h, 0.0).sum(dim=1) / count  # [B, d]
    # max
    return torch.where(valid, h, float("-inf")).amax(dim=1)  # [B, d]


def top_k_gates(logits: Tensor, k: int, mode: str) -> tuple[Tensor, Tensor]:
    """logits [B, E] -> (gates [B, E], probs [B, E]).

    Selection: the k largest logits; on equal logits the lower expert index wins (a stable
    descending sort: the order ONNX TopK also gives). probs = softmax(logits) over all E.
    paper:        gates = probs on the selected experts, 0 elsewhere.
    renormalized: gates = softmax over the selected logits only, 0 elsewhere.
    """
    probs = torch.softmax(logits, dim=-1)  # [B, E]
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices  # [B, E]
    chosen = order[:, :k]  # [B, k]
    selected = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)  # [B, E]
    if mode == "paper":
        gates = torch.where(selected, probs, 0.0)
    else:
        gates = torch.softmax(torch.where(selected, logits, float("-inf")), dim=-1)
        gates = torch.where(selected, gates, 0.0)
    return gates, probs


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
