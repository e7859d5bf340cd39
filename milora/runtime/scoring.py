"""Scoring continuations through an exported directory: multiple-choice evaluation with the
runtime, with the semantics of milora.train.eval (routing from the question's prompt only).

    log p(option | prompt) = log p(o_1 | prompt) + sum_j log p(o_j | prompt, o_<j)

The prompt is prefilled once (its routers run; its KV and gates kept); the C options then run
as one decode-graph call on C copies of that KV with the prompt's gates, right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from milora.errors import TenantError


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def score_options(engine, tenant: str | None, prompt_ids: Sequence[int], options: Sequence[Sequence[int]]) -> list[float]:
    """Summed log-likelihood of each option (token ids) as the continuation of the prompt."""
    backend = engine.backend
    slot = engine.acquire_slot(tenant)
    try:
        last, gates, kv = backend.prefill([list(prompt_ids)], [slot])  # [1, V], [1, L, 7]
        first = _log_softmax(last[0])
        c, longest = len(options), max(len(o) for o in options)
        ids = np.full((c, longest), engine.bundle.pad_token_id, dtype=np.int64)
        mask = np.zeros((c, longest), dtype=np.int64)
        for i, o in enumerate(options):
            ids[i, : len(o)], mask[i, : len(o)] = o, 1
        kv = backend.repeat_rows(kv, c)
        rows = backend.bind_rows(np.full(c, slot, dtype=np.int64), np.repeat(gates, c, axis=0))
        logits = backend.extend(ids, mask, kv, rows)
        logp = _log_softmax(logits)  # [C, O, V]
        return [float(first[o[0]] + sum(logp[i, j - 1, o[j]] for j in range(1, len(o)))) for i, o in enumerate(options)]
    finally:
        engine.release_slot(tenant)


@dataclass
class MCResult:
    accuracy: float
    n: int
    correct: list[bool] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)


def evaluate_mc(engine, tenant: str | None, items, chat: bool = True, norm: str = "char") -> MCResult:
    """Accuracy on multiple-choice items (objects with .prompt, .choices, .answer_index), options
    normalised as milora.train.eval does: by characters ('char'), tokens ('token') or not ('none')."""
    if tenant is not None and tenant not in engine.tenants:
        raise TenantError(f"unknown tenant {tenant!r}")
    bundle = engine.bundle
    correct, preds = [], []
    for ex in items:
        text = bundle.apply_chat_template([{"role": "user", "content": ex.prompt}]) if chat and bundle.chat_template \
            else ex.prompt + "\n"
        options = [bundle.encode(o) or [bundle.pad_token_id] for o in ex.choices]
        scores = score_options(engine, tenant, bundle.encode(text), options)
        denom = [{"char": max(1, len(ch)), "token": len(o), "none": 1}[norm] for ch, o in zip(ex.choices, options)]
        scores = [s / d for s, d in zip(scores, denom)]
        best = int(np.argmax(scores))
        preds.append(best)
        correct.append(best == ex.answer_index)
    return MCResult(float(np.mean(correct)) if correct else 0.0, len(correct), correct, preds)
