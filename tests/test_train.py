"""milora-train on a tiny random model: loss goes down, prompt tokens carry no loss, early
stopping, exact resume, load-balancing, saved adapters load."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_llama
from milora.format.config import MiloraConfig
from milora.model.model import MiloraModel
from milora.train.data import Example
from milora.train.encode import IGNORE, collate, encode
from milora.train.loop import TrainConfig, dev_loss, train
from milora.format.tolerances import close
from train_helpers import char_tokenizer


def toy_examples(n: int = 12) -> list[Example]:
    words = ["red", "blue", "green", "gold"]
    return [Example(f"{words[i % 4]} {i}?", f"{words[(i + 1) % 4]}!", key=f"toy-{i}") for i in range(n)]


def base():
    # A larger init than HF's 0.02 gives the tiny model logits with some range, so a few LoRA
    # steps visibly move the loss.
    return tiny_llama(0, initializer_range=0.3)


def fresh(seed: int = 0, **options) -> MiloraModel:
    torch.manual_seed(seed)
    return MiloraModel(base(), MiloraConfig(rank=4, alpha=8, **options))


def test_a_few_steps_lower_the_loss(tmp_path):
    tok, data = char_tokenizer(), toy_examples()
    model = fresh()
    rows = [encode(tok, e, 64, chat=False) for e in data]
    before = dev_loss(model, rows, 0, 16)
    cfg = TrainConfig(lr=3e-2, max_steps=8, batch_size=4, eval_every=100, warmup_ratio=0.0)
    result = train(model, tok, data, [], cfg, tmp_path, progress=False)
    after = dev_loss(model, rows, 0, 16)
    assert result.steps == 8
    assert after < before - 0.1, (before, after)


def test_prompt_tokens_carry_no_loss():
    tok = char_tokenizer()
    ex = Example("what colour?", "blue")
    row = encode(tok, ex, 64, chat=False)
    batch = collate([row, encode(tok, Example("q", "a longer answer"), 64, chat=False)], 0)
    labels = batch["labels"]
    # Labels exist exactly on the response tokens (+ EOS) of each row; padding and prompt: none.
    assert (labels[0, : row.prompt_len] == IGNORE).all()
    assert int((labels[0] != IGNORE).sum()) == len(tok.encode("blue", add_special_tokens=False)) + 1
    assert torch.equal(batch["routing_mask"][0, : row.prompt_len], torch.ones(row.prompt_len, dtype=torch.long))
    assert int(batch["routing_mask"][0].sum()) == row.prompt_len
    # The model's loss equals cross-entropy over the response positions alone.
    model = fresh()
    out = model(**batch)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    keep = tgt != IGNORE
    manual = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert torch.allclose(out.lm_loss, manual, **close("torch", "loss"))
    full = torch.nn.functional.cross_entropy(out.logits[0, :-1], batch["input_ids"][0, 1:len(row.ids)])
    assert not torch.allclose(out.lm_loss, full)  # a loss that included prompt tokens would differ


def test_early_stopping_triggers(tmp_path):
    tok, data = char_tokenizer(), toy_examples()
    # lr = 0: the dev loss never improves after the first evaluation.
    cfg = TrainConfig(lr=0.0, max_steps=50, batch_size=4, eval_every=2, patience=3)
    result = train(fresh(), tok, data, data[:4], cfg, tmp_path, progress=False)
    assert result.stopped_early
    assert result.steps == 2 * (1 + 3) < 50
    assert result.best_step == 2 and len(result.history) == 4


def test_resume_equals_uninterrupted_run(tmp_path):
    tok, data = char_tokenizer(), toy_examples()
    cfg = TrainConfig(lr=5e-3, max_steps=6, batch_size=3, grad_accum=2, eval_every=2, patience=10, seed=3)
    whole = fresh(seed=1, dropout=0.1)  # dropout: the RNG state must survive the resume too
    train(whole, tok, data, data[:3], cfg, tmp_path / "a", progress=False)
    first = fresh(seed=1, dropout=0.1)
    part = train(first, tok, data, data[:3], cfg, tmp_path / "b", stop_after=3, progress=False)
    assert part.steps == 3
    second = fresh(seed=99, dropout=0.1)  # different init: everything must come from the checkpoint
    resumed = train(second, tok, data, data[:3], cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.steps == 6
    a, b = whole.adapter_state_dict(), second.adapter_state_dict()
    assert a.keys() == b.keys()
    moved = max(float((a[k] - fresh(seed=1, dropout=0.1).adapter_state_dict()[k]).abs().max()) for k in a)
    assert moved > 1e-3  # training did change the adapter
    for k in a:
        torch.testing.assert_close(a[k], b[k], **close("torch", "weights"), msg=k)


def test_resume_refuses_changed_options(tmp_path):
    from milora.errors import TrainingError

    tok, data = char_tokenizer(), toy_examples()
    cfg = TrainConfig(lr=1e-3, max_steps=4, batch_size=4, eval_every=2)
    train(fresh(), tok, data, [], cfg, tmp_path, stop_after=2, progress=False)
    with pytest.raises(TrainingError, match="lr"):
        train(fresh(), tok, data, [], TrainConfig(lr=2e-3, max_steps=4, batch_size=4, eval_every=2), tmp_path,
              resume=True, progress=False)


def test_trained_adapter_loads_with_same_outputs(tmp_path):
    tok, data = char_tokenizer(), toy_examples()
    model = fresh(top_k=2)
    cfg = TrainConfig(lr=1e-2, max_steps=4, batch_size=4, eval_every=2)
    train(model, tok, data, [], cfg, tmp_path, progress=False)  # no dev set: the final adapter is saved
    loaded = MiloraModel.from_pretrained(base(), tmp_path).eval()
    untrained = fresh(top_k=2).eval()
    batch = collate([encode(tok, e, 64, chat=False) for e in data[:3]], 0)
    model.eval()
    with torch.no_grad():
        want, got, before = model(**batch), loaded(**batch), untrained(**batch)
    torch.testing.assert_close(got.routing.gates, want.routing.gates)
    torch.testing.assert_close(got.logits, want.logits, **close("torch", "logits"))
    assert float((before.logits - want.logits).abs().max()) > 1e-3  # the file holds the trained state


def test_load_balancing_loss_spreads_a_skewed_routing():
    tok = char_tokenizer()
    model = fresh(pooler="mean", activation="identity", lb_coef=1.0)
    data = [Example(f"prompt number {i} " + "xyz"[i % 3] * (i % 5 + 1), "ok") for i in range(16)]
    batch = collate([encode(tok, e, 64, chat=False) for e in data], 0)
    # Skew every router towards expert 0 along the direction of the mean pooled prompt.
    pooled = {}
    hooks = [r.register_forward_pre_hook(lambda m, a, l=l: pooled.__setitem__(
        l, (a[0] * a[1][..., None]).sum(1) / a[1].sum(1, keepdim=True))) for l, r in enumerate(model.routers)]
    with torch.no_grad():
        model(**batch)
        for h in hooks:
            h.remove()
        for l, r in enumerate(model.routers):
            direction = pooled[l].mean(0)
            r.weight.zero_()
            r.weight[0] = 3.0 * direction / direction.norm() ** 2

    def spread():
        with torch.no_grad():
            out = model(**batch)
        probs = out.routing.gates  # [B, L, 7], k = 1: the single chosen gate per layer
        chosen_0 = float((probs[:, :, 0] > 0).float().mean())
        return chosen_0, float(out.lb_loss)

    start_share, start_lb = spread()
    assert start_share >= 0.75, "setup: routing should start skewed towards expert 0"
    opt = torch.optim.Adam([p for r in model.routers for p in r.parameters()], lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        model(**batch).lb_loss.backward()
        opt.step()
    end_share, end_lb = spread()
    assert end_lb < start_lb
    assert end_share < start_share
    uniform = 1.0  # switch loss at perfect balance is E * sum (1/E)(1/E) = 1
    assert abs(end_lb - uniform) < abs(start_lb - uniform)
    assert math.isfinite(end_lb)
