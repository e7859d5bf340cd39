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


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters.
    repetition_penalty > 1 divides positive (multiplies negative) logits of tokens already in
    the prompt or output (CTRL-style, as in Hugging Face)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(not s for s in self.stop):
            raise SamplingError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Sampler:
    params: SamplingParams
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray) -> int:
        """logits [V] float; seen: token ids of prompt + output so far."""
        p = self.params
        if p.greedy and p.repetition_penalty == 1.0:
            return int(np.argmax(logits))  # hot path: no copy of the [V] logits
        logits = logits.astype(np.float64, copy=True)
        if p.repetition_penalty != 1.0 and seen.size:
            ids = np.unique(seen)
            vals = logits[ids]
            logits[ids] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
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
