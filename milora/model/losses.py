"""Load-balancing losses over a batch of prompts (docs/method.md, "Training").

probs [B, E]: router probabilities (softmax over all E experts) of one layer, one row per
prompt. Both losses are averaged over layers by load_balancing_loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def switch_loss(probs: Tensor) -> Tensor:
    """Paper eq. 5 (Switch Transformer): E * sum_i f_i * P_i, f_i = fraction of prompts whose
    argmax expert is i (first index on ties), P_i = mean probability of expert i."""
    e = probs.shape[-1]
    f = torch.nn.functional.one_hot(probs.argmax(dim=-1), e).float().mean(dim=0)  # [E]
    p = probs.float().mean(dim=0)  # [E]
    return e * (f * p).sum()


def cv2_loss(probs: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation of expert importance across the batch (Shazeer et al.):
    importance_i = sum_b probs[b, i]; loss = var(importance) / mean(importance)^2, var with
    Bessel's correction (n - 1), as Shazeer's cv_squared."""
    importance = probs.float().sum(dim=0)  # [E]
    return importance.var() / (importance.mean() ** 2 + eps)


def load_balancing_loss(layer_probs: list[Tensor], kind: str) -> Tensor | None:
    """Mean over layers of the chosen loss; None for kind 'none' or when nothing was routed."""
    if kind == "none" or not layer_probs:
        return None
    fn = switch_loss if kind == "switch" else cv2_loss
    return torch.stack([fn(p) for p in layer_probs]).mean()
