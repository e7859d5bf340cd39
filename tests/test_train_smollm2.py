"""End to end on the real SmolLM2-135M-Instruct (slow: run with -m slow)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_milora_training_fits_its_examples_and_evaluates(tmp_path):
    import torch

    from milora.format.config import MiloraConfig
    from milora.model.model import MiloraModel
    from milora.train.api import load_base
    from milora.train.data import load_task
    from milora.train.encode import encode, pad_id_of
    from milora.train.eval import evaluate_mc
    from milora.train.loop import TrainConfig, dev_loss, train

    base, tok = load_base("smollm2")
    data = load_task("arc_e", "train", limit=4)
    torch.manual_seed(0)
    model = MiloraModel(base, MiloraConfig(rank=8, alpha=16))
    rows = [encode(tok, e, 192, chat=False) for e in data]
    before = dev_loss(model, rows, pad_id_of(tok), 4)
    cfg = TrainConfig(lr=3e-3, max_steps=4, batch_size=4, eval_every=10, warmup_ratio=0.0, chat=False, max_length=192)
    train(model, tok, data, [], cfg, tmp_path, progress=False)
    after = dev_loss(model, rows, pad_id_of(tok), 4)
    assert after < before, (before, after)
    items = load_task("arc_e", "test", limit=4)
    res = evaluate_mc(model, tok, items, chat=False)
    assert res.n == 4 and res.correct == [p == ex.choices[ex.answer_index] for p, ex in zip(res.predictions, items)]
    assert res.accuracy == sum(res.correct) / 4
    assert (tmp_path / "milora_adapter.safetensors").is_file()
