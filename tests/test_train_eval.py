"""Evaluation: cached option scoring equals full-sequence scoring with prompt-only routing;
answer extraction; bootstrap intervals; routing statistics files."""

from __future__ import annotations

import json

import torch

from helpers import randomize_adapter, tiny_llama
from milora.format.config import MiloraConfig
from milora.model.model import MiloraModel
from milora.train.data import Example
from milora.train.encode import collate, encode
from milora.train.eval import bootstrap_ci, evaluate, extract_number, option_scores, paired_bootstrap, same_number
from milora.format.tolerances import close
from train_helpers import char_tokenizer

MC = [Example(f"pick {i}: which is right?", "right", ["wrong", "right", "maybe so"], 1, key=f"mc{i}")
      for i in range(4)]


def _reference_scores(model, tok, ex: Example) -> list[float]:
    """Each prompt + option sequence scored on its own, routing on the prompt span only (a
    plain HF model: no routing)."""
    rows = [encode(tok, ex, 128, chat=False, response=o, eos=False) for o in ex.choices]
    batch = collate(rows, 0)
    keep = ("input_ids", "attention_mask") + (("routing_mask",) if isinstance(model, MiloraModel) else ())
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in keep}).logits
    logp = torch.log_softmax(logits.float(), -1)[:, :-1]
    tgt = batch["labels"][:, 1:]
    lp = torch.where(tgt != -100, logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0], 0.0).sum(1)
    return [float(v) / len(o) for v, o in zip(lp, ex.choices)]


def test_cached_option_scores_match_full_sequences():
    tok = char_tokenizer()
    model = randomize_adapter(MiloraModel(tiny_llama(0), MiloraConfig(rank=4, alpha=8, top_k=2)), seed=5).eval()
    counts = torch.zeros(model.num_layers, 7)
    for ex in MC[:2]:
        got = option_scores(model, tok, ex, chat=False, routing_counts=counts)
        want = _reference_scores(model, tok, ex)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **close("torch", "scores"))
    # Routing seen while scoring: k = 2 experts per layer for each of the 2 prompts.
    torch.testing.assert_close(counts.sum(dim=1), torch.full((model.num_layers,), 4.0))


def test_base_model_and_adapter_both_evaluate():
    """Each prediction is the argmax of independently computed option scores, each item is
    correct exactly when that prediction is its answer, and accuracy is their mean."""
    tok = char_tokenizer()
    adapted = randomize_adapter(MiloraModel(tiny_llama(0), MiloraConfig(rank=4, alpha=8)), seed=1).eval()
    for model in (tiny_llama(0), adapted):
        r = evaluate(model, tok, MC, chat=False)
        scores = [_reference_scores(model, tok, ex) for ex in MC]
        want = [ex.choices[max(range(len(sc)), key=sc.__getitem__)] for ex, sc in zip(MC, scores)]
        assert r.n == 4 and r.predictions == want
        assert r.correct == [p == ex.choices[ex.answer_index] for p, ex in zip(r.predictions, MC)]
        assert r.accuracy == sum(r.correct) / 4 and r.ci_low <= r.accuracy <= r.ci_high



def test_answer_extraction():
    assert extract_number("so 3 + 4 = 7.\nThe answer is 1,234.") == "1234"
    assert extract_number("we get 12 then 15") == "15"
    assert extract_number("no digits here") is None
    assert same_number("18.0", "18") and not same_number("18", "19") and not same_number(None, "1")


def test_bootstrap_intervals():
    lo, hi = bootstrap_ci([1.0] * 30 + [0.0] * 10)
    assert lo < 0.75 < hi and hi - lo < 0.4
    d, lo, hi = paired_bootstrap([True] * 20, [False] * 20)
    assert d == 1.0 and lo == hi == 1.0
    d, lo, hi = paired_bootstrap([True, False] * 10, [False, True] * 10)
    assert d == 0.0 and lo < 0 < hi


def test_routing_stats_files(tmp_path):
    from milora.train.routing_stats import expert_frequencies, write_stats

    tok = char_tokenizer()
    model = randomize_adapter(MiloraModel(tiny_llama(0, layers=3), MiloraConfig(rank=4, alpha=8, top_k=2)), seed=2)
    prompts = [Example(f"prompt {i} " + "ab" * i, "x") for i in range(10)]
    freq = expert_frequencies(model, tok, prompts, chat=False, batch_size=4)
    assert freq.shape == (3, 7)
    torch.testing.assert_close(freq.sum(dim=1), torch.full((3,), 2.0))  # k = 2 experts per layer
    js, png = write_stats(freq, len(prompts), tmp_path / "routing", label="toy")
    data = json.loads(js.read_text())
    assert data["prompts"] == 10 and len(data["frequency"]) == 3 and data["experts"][0] == "q_proj"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _ScriptedGenerator:
    """Stands in for a model in evaluate_math: 'generates' a fixed reply after each prompt, so the
    test checks prompt batching (left padding), decoding and answer comparison."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.seen = tok, replies, []

    def eval(self):
        return self

    def generate(self, ids, attention_mask, max_new_tokens, **kw):
        self.seen.append((ids.clone(), attention_mask.clone()))
        rows = []
        for r in range(ids.shape[0]):
            reply = self.tok.encode(self.replies.pop(0), add_special_tokens=False)
            rows.append(torch.cat([ids[r], torch.tensor(reply)]))
        t = max(len(x) for x in rows)
        return torch.stack([torch.nn.functional.pad(x, (0, t - len(x))) for x in rows])


def test_math_generation_scoring():
    from milora.train.eval import evaluate_math

    tok = char_tokenizer()
    examples = [Example("2+2?", "4", answer="4"), Example("a longer prompt: 10*3?", "30", answer="30"),
                Example("1+1?", "2", answer="2")]
    model = _ScriptedGenerator(tok, ["so 2+2=4. The answer is 4.", "The answer is 31.", "1+1 makes 2"])
    res = evaluate_math(model, tok, examples, chat=False, batch_size=2)
    assert res.correct == [True, False, True]
    ids, mask = model.seen[0]
    # Left padding: the short prompt's tokens end at the last column, padding sits in front.
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
