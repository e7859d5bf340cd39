"""Slow: the runtime on the packaged SmolLM2 with the demo tenants (milora-demo's export).

Run with `python -m pytest -m slow tests/test_runtime_smollm2.py -s` (first run trains the demo
tenants and exports: minutes)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

NEAR_TIE = 1e-3  # fp32 logits of a 30-layer model differ by ~1e-4 between backends


@pytest.fixture(scope="module")
def demo():
    from milora.assets import cache_root
    from milora.demo_build import build

    built = build(cache_root())  # milora-demo's stages 1-3, cached
    return built.base, built.tenants, built.out_dir


def questions(per_tenant: int) -> list[tuple[str, str]]:
    """(tenant, prompt) pairs from each demo tenant's own task test split."""
    from milora.train.data import load_task
    from milora.train.demo import DEMO_TENANTS

    return [(t, ex.prompt) for t, spec in DEMO_TENANTS.items() for ex in load_task(spec.task, "test", limit=per_tenant)]


def _reference(base_dir, adapter_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from milora.model.model import MiloraModel

    tok = AutoTokenizer.from_pretrained(base_dir)
    return tok, MiloraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()


def test_greedy_tokens_equal_reference_in_one_mixed_batch(demo):
    import torch

    from milora.runtime import Engine, SamplingParams

    base_dir, tenants, out_dir = demo
    engine = Engine(out_dir, max_batch=8)
    items = questions(2)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    reqs = [engine.submit(t, messages=[{"role": "user", "content": q}], params=params) for t, q in items]
    engine.run_until_done()
    compared = near_ties = 0
    for (tenant, q), req in zip(items, reqs):
        tok, model = _reference(base_dir, tenants[tenant])
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        assert ids[0].tolist() == req.prompt_ids  # the runtime's jinja template = transformers'
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, output_scores=True, return_dict_in_generate=True)
        ref = out.sequences[0, ids.shape[1]:].tolist()
        for step, (r, g) in enumerate(zip(ref, req.output_ids)):
            top2 = out.scores[step][0].topk(2).values
            if float(top2[0] - top2[1]) < NEAR_TIE:
                near_ties += 1
                break  # after a near-tie the continuations may legitimately differ
            compared += 1
            assert r == g, f"{tenant}: token {step} differs: reference {ref} runtime {req.output_ids}"
    print(f"\ncompared {compared} tokens, {near_ties} near-tie(s) (margin < {NEAR_TIE})")
    assert compared >= len(items) * 10


def test_task_accuracy_through_runtime_equals_pytorch(demo):
    from milora.runtime import Engine
    from milora.runtime.scoring import evaluate_mc as runtime_mc
    from milora.train.data import load_task
    from milora.train.eval import evaluate_mc, paired_bootstrap

    base_dir, tenants, out_dir = demo
    items = load_task("arc_e", "test", limit=60)
    tok, model = _reference(base_dir, tenants["arc-easy"])
    ref = evaluate_mc(model, tok, items)
    got = runtime_mc(Engine(out_dir), "arc-easy", items)
    agree = float(np.mean([a == b for a, b in zip(ref.correct, got.correct)]))
    diff, lo, hi = paired_bootstrap(got.correct, ref.correct)
    print(f"\nARC-e test (n={len(items)}): PyTorch {100 * ref.accuracy:.1f}%, runtime {100 * got.accuracy:.1f}%, "
          f"per-item agreement {100 * agree:.1f}%, difference {100 * diff:+.1f} (95% CI {100 * lo:+.1f}..{100 * hi:+.1f})")
    assert lo <= 0.0 <= hi and agree >= 0.95
