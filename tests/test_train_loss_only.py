"""forward(..., loss_only=True): the LM head only on labelled (response) positions gives the
same loss and the same adapter gradients as the full-logits path."""

from __future__ import annotations

import pytest
import torch

from helpers import randomize_adapter, tiny_llama, tiny_qwen2
from milora.errors import RoutingError
from milora.format.config import MiloraConfig
from milora.model.model import MiloraModel
from milora.train.data import Example
from milora.train.encode import collate, encode
from train_helpers import char_tokenizer


def _batch():
    tok = char_tokenizer()
    # Rows of different prompt and response lengths: right padding, labels start per row.
    examples = [Example("what colour is the sky?", "blue"), Example("q", "a longer answer here"),
                Example("two plus two", "4")]
    return collate([encode(tok, e, 64, chat=False) for e in examples], 0)


def _loss_and_grads(model: MiloraModel, batch, loss_only: bool):
    model.zero_grad(set_to_none=True)
    out = model(**batch, loss_only=loss_only)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.adapter_parameters_by_name().items() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("options", [{}, {"top_k": 2, "lb_coef": 0.1}, {"routed": False}])
def test_loss_only_equals_the_full_path(builder, options):
    torch.manual_seed(0)
    model = randomize_adapter(MiloraModel(builder(0), MiloraConfig(rank=4, alpha=8, **options)), 3, b_scale=0.1)
    model.train()  # dropout is 0 by default: both passes see the same function
    batch = _batch()
    full, g_full = _loss_and_grads(model, batch, loss_only=False)
    fast, g_fast = _loss_and_grads(model, batch, loss_only=True)
    assert fast.logits is None and full.logits is not None
    torch.testing.assert_close(fast.lm_loss, full.lm_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-5, atol=1e-6)
    if full.lb_loss is not None:
        torch.testing.assert_close(fast.lb_loss, full.lb_loss)
    assert g_full.keys() == g_fast.keys() and len(g_full) > 0
    for name in g_full:
        torch.testing.assert_close(g_fast[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(float(g.abs().max()) > 0 for g in g_full.values())  # the comparison is not vacuous
    # The routing is the same too (the training forward's routing state).
    torch.testing.assert_close(fast.routing.gates, full.routing.gates)


def test_loss_only_needs_labels():
    model = MiloraModel(tiny_llama(0), MiloraConfig(rank=4, alpha=8))
    batch = _batch()
    with pytest.raises(RoutingError, match="got labels=None.*needs labels"):
        model(batch["input_ids"], batch["attention_mask"], loss_only=True)


def test_default_forward_still_returns_full_logits():
    model = MiloraModel(tiny_llama(0), MiloraConfig(rank=4, alpha=8))
    batch = _batch()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, 96)
