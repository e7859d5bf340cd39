"""Token sampling and stop rules for the runtime (numpy only).

One request's next token from its last logits [V]: repetition penalty, then greedy or
temperature -> top-k -> top-p sampling with the request's own seeded generator, so a
request's output never depends on which other requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from milora.errors import MiloraError


class SamplingError(MiloraError, ValueError):
    """Invalid sampling parameters or stop rules."""


MAX_LOGPROBS = 20  # top alternatives per token (the limit OpenAI-style APIs use)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and bool(np.isfinite(value))


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters.
    min_new_tokens: EOS and stop_token_ids cannot end the request before that many tokens.
    repetition_penalty > 1 divides positive (multiplies negative) logits of tokens already in
    the prompt or output (CTRL-style, as in Hugging Face). logprobs N (0..20): record, per
    generated token, its log-probability and the N most likely alternatives, from the model's
    own distribution (log-softmax of the logits, before temperature and penalties); None: off."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("min_new_tokens", _is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
             f"an integer in 0..max_new_tokens ({self.max_new_tokens})"),
            ("temperature", _is_real(self.temperature) and self.temperature >= 0, "a finite number >= 0 (0 = greedy)"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", _is_real(self.top_p) and 0.0 < self.top_p <= 1.0, "a number in (0, 1] (1 = off)"),
            ("repetition_penalty", _is_real(self.repetition_penalty) and self.repetition_penalty > 0,
             "a finite number > 0 (1 = off)"),
            ("seed", self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2 ** 63),
             "None or an integer in [0, 2**63)"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "True or False"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"None or an integer in 0..{MAX_LOGPROBS}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise SamplingError(f"{name}={getattr(self, name)!r} is invalid; expected {expected}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise SamplingError(f"stop={self.stop!r} is invalid; expected a string or a list of strings") from None
        if any(not isinstance(s, str) or not s for s in stop):
            raise SamplingError(f"stop={list(stop)!r} is invalid; expected non-empty strings")
        ids = tuple(self.stop_token_ids) if not isinstance(self.stop_token_ids, (str, bytes)) else (self.stop_token_ids,)
        if any(not _is_int(t) or t < 0 for t in ids):
            raise SamplingError(f"stop_token_ids={list(ids)!r} is invalid; expected non-negative token ids")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """(log p(token), [(id, log p)] of the `top` most likely ids, most likely first) under
    softmax(logits) [V]."""
    x = logits.astype(np.float64)
    m = x.max()
    logp = x - m - np.log(np.exp(x - m).sum())
    best = np.argpartition(-logp, top)[:top] if 0 < top < logp.size else np.arange(logp.size if top else 0)
    best = best[np.argsort(-logp[best], kind="stable")]
    return float(logp[token]), [(int(i), float(logp[i])) for i in best]


@dataclass
class Sampler:
    params: SamplingParams
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        """logits [V] float; seen [V] bool: the ids of prompt + output so far (read only for a
        repetition penalty; kept up to date by the caller, so no per-step work grows with the
        context)."""
        p = self.params
        if p.greedy and p.repetition_penalty == 1.0:
            return int(np.argmax(logits))  # hot path: no copy of the [V] logits
        logits = logits.astype(np.float64, copy=True)
        if p.repetition_penalty != 1.0 and seen is not None:
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))  # first index on ties, like torch.argmax
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cut = int(np.searchsorted(cum, p.top_p) + 1)
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def find_stop(text: str, stops: tuple[str, ...], search_from: int) -> int | None:
    """Index where the earliest stop string begins in text (searching from a little before
    search_from so a stop split across tokens is found), or None."""
    best = None
    for s in stops:
        i = text.find(s, max(0, search_from - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best
