"""Evaluation: accuracy on a task split, for the base model, a LoRA or a MiLoRA adapter.

Multiple choice: each option is scored by its log-likelihood as the response to the
question's prompt; routing is computed from the prompt only (the routing mask), exactly as
at inference, so every option of a question sees the same experts. Math: greedy generation
and extraction of the final number. Accuracy comes with a 95% percentile-bootstrap interval
over questions; paired_bootstrap compares two systems on the same questions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from milora.format.padding import left_pad
from milora.errors import DataError
# One definition of "the final number of a math answer", shared with the runtime's scorer.
from milora.runtime.scoring import NORMS, option_norm
from milora.runtime.scoring import extract_number, same_number  # noqa: F401 (re-exported)
from milora.train.data import Example
from milora.train.encode import pad_id_of, prompt_ids


@dataclass
class EvalResult:
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    correct: list[bool] = field(default_factory=list)  # per example, in input order (for pairing)
    predictions: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"accuracy {100 * self.accuracy:.1f}% (95% CI {100 * self.ci_low:.1f}-{100 * self.ci_high:.1f}, n={self.n})"


def bootstrap_ci(values: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling items)."""
    if not values:
        return (math.nan, math.nan)
    x = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x), (n_boot, len(x)), generator=g)
    means = x[idx].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


def paired_bootstrap(a: list[bool], b: list[bool], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Difference of accuracies mean(a) - mean(b) on the same items, with a 95% paired
    bootstrap interval (the same resampled items for both systems)."""
    if len(a) != len(b):
        raise DataError(f"paired comparison needs results on the same items; got {len(a)} and {len(b)}")
    diff = [float(x) - float(y) for x, y in zip(a, b)]
    lo, hi = bootstrap_ci(diff, n_boot, seed)
    return sum(diff) / len(diff), lo, hi


def _call(model, ids, mask, routing=None, past=None, **kwargs):
    """(logits [B, T, V], routing or None, cache) for a MiloraModel or a plain HF model."""
    from milora.model.model import MiloraModel

    if isinstance(model, MiloraModel):
        out = model(ids, mask, routing=routing, past_key_values=past, use_cache=True, **kwargs)
        return out.logits, out.routing, out.past_key_values
    out = model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True, **kwargs)
    return out.logits, None, out.past_key_values


@torch.no_grad()
def option_scores(model, tokenizer, ex: Example, chat: bool = True, max_length: int = 512,
                  norm: str = "char", routing_counts: torch.Tensor | None = None) -> list[float]:
    """Log-likelihood of each option as the response to ex.prompt, normalised by the option's
    characters (norm='char'), tokens ('token') or not at all ('none').

    The prompt runs once (routing computed from it, KV cached); the C options then run as one
    batch on C copies of that cache with the prompt's routing, which is what scoring each
    prompt + option sequence separately computes, at a fraction of the cost.
    routing_counts [L, 7], if given, gets this prompt's active experts added (routing statistics
    for free)."""
    if norm not in NORMS:
        raise DataError(f"norm={norm!r}; expected one of {', '.join(NORMS)}")
    if not ex.choices:
        raise DataError(f"example {ex.key!r} has no choices; multiple-choice scoring needs them")
    options = [tokenizer.encode(o, add_special_tokens=False) or [pad_id_of(tokenizer)] for o in ex.choices]
    longest = max(len(o) for o in options)
    prompt = prompt_ids(tokenizer, ex.prompt, chat)[-max(1, max_length - longest):]
    ids = torch.tensor([prompt])  # [1, P]
    # Only the last prompt position's logits are needed: skip the LM head elsewhere.
    logits, routing, cache = _call(model, ids, torch.ones_like(ids), logits_to_keep=1)
    if routing_counts is not None and routing is not None:
        routing_counts += routing.active()[0].to(routing_counts.dtype)
    first = torch.log_softmax(logits[0, -1].float(), dim=-1)  # [V]: predicts each option's first token
    c, p = len(options), len(prompt)
    opt_ids = torch.full((c, longest), pad_id_of(tokenizer), dtype=torch.long)  # [C, O], right-padded
    opt_mask = torch.zeros((c, longest), dtype=torch.long)
    for i, o in enumerate(options):
        opt_ids[i, : len(o)] = torch.tensor(o)
        opt_mask[i, : len(o)] = 1
    cache.batch_repeat_interleave(c)
    mask = torch.cat([torch.ones((c, p), dtype=torch.long), opt_mask], dim=1)  # [C, P + O]
    routing = routing.repeat_interleave(c) if routing is not None else None
    logits2, _, _ = _call(model, opt_ids, mask, routing=routing, past=cache)  # [C, O, V]
    logp = torch.log_softmax(logits2.float(), dim=-1)
    scores = []
    for i, o in enumerate(options):
        lp = first[o[0]] + sum(logp[i, j - 1, o[j]] for j in range(1, len(o)))
        scores.append(float(lp) / option_norm(ex.choices[i], o, norm))
    return scores


def evaluate_mc(model, tokenizer, examples: list[Example], chat: bool = True, max_length: int = 512,
                norm: str = "char", progress: bool = False, routing_counts: torch.Tensor | None = None) -> EvalResult:
    from milora.progress import progress as make_progress

    model.eval()
    correct, preds = [], []
    with make_progress(len(examples), "eval", "q", enabled=progress) as bar:
        for ex in examples:
            scores = option_scores(model, tokenizer, ex, chat, max_length, norm, routing_counts)
            best = max(range(len(scores)), key=scores.__getitem__)
            correct.append(best == ex.answer_index)
            preds.append(ex.choices[best])
            bar.update()
    return _result(correct, preds)


@torch.no_grad()
def evaluate_math(model, tokenizer, examples: list[Example], chat: bool = True, max_new_tokens: int = 256,
                  batch_size: int = 8, progress: bool = False) -> EvalResult:
    """Greedy generation; correct when the extracted number equals the example's answer."""
    from milora.progress import progress as make_progress

    model.eval()
    pad = pad_id_of(tokenizer)
    correct, preds = [], []
    bar = make_progress(-(-len(examples) // batch_size), "eval", "batch", enabled=progress)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [prompt_ids(tokenizer, e.prompt, chat) for e in chunk]
        ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, pad))  # prompts end where generation starts
        t = ids.shape[1]
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for r, e in enumerate(chunk):
            text = tokenizer.decode(out[r, t:], skip_special_tokens=True)
            preds.append(text)
            correct.append(same_number(extract_number(text), e.answer))
        bar.update()
    bar.close()
    return _result(correct, preds)


def _result(correct: list[bool], preds: list[str]) -> EvalResult:
    if not correct:
        raise DataError("nothing to evaluate: the example list is empty")
    lo, hi = bootstrap_ci([float(c) for c in correct])
    return EvalResult(sum(correct) / len(correct), lo, hi, len(correct), correct, preds)


def evaluate(model, tokenizer, examples: list[Example], chat: bool = True, progress: bool = False,
             max_new_tokens: int = 256, norm: str = "char", max_length: int = 512) -> EvalResult:
    """Multiple choice when the examples have choices, else math generation."""
    if all(e.choices for e in examples):
        return evaluate_mc(model, tokenizer, examples, chat, max_length, norm, progress)
    if all(e.answer is not None for e in examples):
        return evaluate_math(model, tokenizer, examples, chat, max_new_tokens, progress=progress)
    raise DataError("cannot evaluate: examples need either 'choices' + 'answer_index' (multiple choice) "
                    "or 'answer' (math) on every item")
