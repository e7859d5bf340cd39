"""Scoring options through the runtime equals the PyTorch reference with routing from the prompt only."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from milora.runtime import Engine
from milora.runtime.scoring import evaluate_mc, score_options
from milora.format.tolerances import close
from runtime_helpers import random_prompts


@pytest.fixture(scope="module")
def exported(tiny_any_export):
    return tiny_any_export


def reference_scores(model_dir, tenant, prompt, options):
    from transformers import AutoModelForCausalLM

    from milora.model.model import MiloraModel

    model = MiloraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                                        model_dir / "adapters" / tenant)
    with torch.no_grad():
        routing = model.compute_routing(torch.tensor([prompt]))  # the prompt alone routes
        out = []
        for o in options:
            ids = torch.tensor([prompt + o])
            logp = torch.log_softmax(model(ids, routing=routing).logits[0].double(), dim=-1)  # [P+O, V]
            out.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(o)))
    return out


@pytest.mark.parametrize("tenant", ["alpha", "beta", "gamma"])
def test_option_scores_equal_reference(exported, tenant):
    model_dir, out_dir = exported
    prompt = random_prompts(4, (7,))[0]
    options = random_prompts(5, (1, 3, 2, 4))
    got = score_options(Engine(out_dir), tenant, prompt, options)
    want = reference_scores(model_dir, tenant, prompt, options)
    np.testing.assert_allclose(got, want, **close("runtime", "scores"))
    assert len(set(np.round(got, 3))) == len(options)  # distinct: the test can tell options apart


def test_evaluate_mc_picks_the_reference_best(exported):
    model_dir, out_dir = exported
    engine = Engine(out_dir)
    items = []
    for i in range(4):
        prompt = " ".join(f"w{t}" for t in random_prompts(20 + i, (6,))[0])
        choices = [" ".join(f"w{t}" for t in o) for o in random_prompts(30 + i, (2, 2, 2))]
        ids = engine.bundle.encode(prompt + "\n")
        ref = reference_scores(model_dir, "delta", ids, [engine.bundle.encode(c) for c in choices])
        best = int(np.argmax([s / len(c) for s, c in zip(ref, choices)]))
        items.append(SimpleNamespace(prompt=prompt, choices=choices, answer_index=best))
    result = evaluate_mc(engine, "delta", items, chat=False)
    assert result.accuracy == 1.0 and result.n == 4
    assert engine.stats()["tenant_refs"] == 0
