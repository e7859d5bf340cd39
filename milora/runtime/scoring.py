"""Scoring through an exported directory, with the semantics of milora.train.eval (routing
from the question's prompt only): multiple choice by option log-likelihood, math by greedy
generation and the final number, accuracy with a percentile-bootstrap interval.

    log p(option | prompt) = log p(o_1 | prompt) + sum_j log p(o_j | prompt, o_<j)

The prompt is prefilled once (its routers run; its KV and gates kept); the C options then run
as one decode-graph call on C copies of that KV with the prompt's gates, right-padded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from milora.errors import RequestError, TenantError
from milora.format.padding import right_pad


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
        if longest == 1:  # one-token options (BoolQ's no / yes): the prompt's logits are all it takes
            return [float(first[o[0]]) for o in options]
        ids, mask = right_pad(options, engine.bundle.pad_token_id)  # options continue the prompt
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


# How an option's summed log-likelihood is normalised before the options are compared (the
# same rule for the PyTorch evaluation, milora.train.eval, and for the runtime's scoring):
# by its characters (as lm-eval-harness's acc_norm), its tokens, or not at all.
NORMS = ("char", "token", "none")


def option_norm(choice: str, option_ids, norm: str) -> int:
    """The divisor of an option's log-likelihood under `norm` (one of NORMS)."""
    return {"char": max(1, len(choice)), "token": max(1, len(option_ids)), "none": 1}[norm]


def evaluate_mc(engine, tenant: str | None, items, chat: bool = True, norm: str = "char") -> MCResult:
    """Accuracy on multiple-choice items (objects with .prompt, .choices, .answer_index), options
    normalised as milora.train.eval does: by characters ('char'), tokens ('token') or not ('none')."""
    if tenant is not None and tenant not in engine.tenants:
        raise TenantError(f"unknown tenant {tenant!r}")
    if norm not in NORMS:
        raise RequestError(f"norm={norm!r}; expected one of {', '.join(NORMS)}")
    bundle = engine.bundle
    correct, preds = [], []
    for ex in items:
        text = bundle.apply_chat_template([{"role": "user", "content": ex.prompt}]) if chat and bundle.chat_template \
            else ex.prompt + "\n"
        options = [bundle.encode(o) or [bundle.pad_token_id] for o in ex.choices]
        scores = score_options(engine, tenant, bundle.encode(text), options)
        scores = [s / option_norm(ch, o, norm) for s, ch, o in zip(scores, ex.choices, options)]
        best = int(np.argmax(scores))
        preds.append(best)
        correct.append(best == ex.answer_index)
    return MCResult(float(np.mean(correct)) if correct else 0.0, len(correct), correct, preds)


_ANSWER_RE = re.compile(r"answer is\s*:?\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?[\d,]*\.?\d+")


def extract_number(text: str) -> str | None:
    """The final answer of a math response: the number after 'answer is', else the last number."""
    m = _ANSWER_RE.findall(text)
    found = m[-1] if m else (_NUMBER_RE.findall(text) or [None])[-1]
    return None if found is None else found.replace(",", "").rstrip(".")


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return math.isclose(float(a), float(b.replace(",", "")), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return a.strip() == b.strip()


@dataclass
class MathResult:
    accuracy: float
    n: int
    correct: list[bool] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)  # the generated texts


def evaluate_math(engine, tenant: str | None, items, max_new_tokens: int = 256, chat: bool = True) -> MathResult:
    """Greedy generation for every item (objects with .prompt and .answer); correct when the
    extracted number equals .answer."""
    return evaluate_math_many(engine, [tenant], items, max_new_tokens, chat)[0]


def evaluate_math_many(engine, tenants: Sequence[str | None], items, max_new_tokens: int = 256,
                       chat: bool = True) -> list[MathResult]:
    """evaluate_math for several tenants (None: the base model) on the same items, every
    request submitted at once: the engine batches rows of different tenants together."""
    from milora.runtime.sampling import SamplingParams

    unknown = [t for t in tenants if t is not None and t not in engine.tenants]
    if unknown:
        raise TenantError(f"unknown tenant(s) {unknown}; this engine serves: {', '.join(engine.tenants.names())}")
    params = SamplingParams(max_new_tokens=max_new_tokens)  # temperature 0: greedy
    chat = chat and bool(engine.bundle.chat_template)  # as evaluate_mc: a plain prompt without a template
    reqs = [[engine.submit(t, messages=[{"role": "user", "content": ex.prompt}], params=params) if chat
             else engine.submit(t, prompt=ex.prompt + "\n", params=params) for ex in items] for t in tenants]
    engine.run_until_done()
    out = []
    for rs in reqs:
        texts = [r.text for r in rs]
        correct = [same_number(extract_number(t), ex.answer) for t, ex in zip(texts, items)]
        out.append(MathResult(float(np.mean(correct)) if correct else 0.0, len(correct), correct, texts))
    return out


def bootstrap_interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (resampling items); for paired
    differences pass per-item differences. NaNs when `values` is empty."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
