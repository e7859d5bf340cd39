"""Route once per prompt: prefill routes, decode reuses (docs/method.md, "Route once per prompt").

Routers are counted with forward hooks on every MiloraRouter. Tenants have non-zero LoRA B
and a seed-specific router (helpers.tenant), so wrong routing shows in tokens and logits.
"""

from __future__ import annotations

import pytest
import torch

from helpers import tenant, tiny_llama, tiny_qwen2
from milora.errors import RoutingError
from milora.model.router import MiloraRouter
from milora.model.routing import RoutingState
from milora.format.tolerances import close

pytestmark = pytest.mark.core

BUILDERS = pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
LAYERS = 2
# No early stop on EOS: every row runs max_new_tokens steps, like the manual loops below.
NO_EOS = dict(eos_token_id=None, pad_token_id=0)


def prompts(seed: int, rows: int, length: int) -> torch.Tensor:
    return torch.randint(3, 96, (rows, length), generator=torch.Generator().manual_seed(seed))


class RouterCounter:
    """Counts MiloraRouter forward calls (and the batch sizes they saw)."""

    def __init__(self, model):
        self.batches: list[int] = []
        for m in model.modules():
            if isinstance(m, MiloraRouter):
                m.register_forward_hook(lambda mod, args, out: self.batches.append(args[0].shape[0]))

    @property
    def calls(self) -> int:
        return len(self.batches)


def routed_alone(model, ids_row: torch.Tensor) -> RoutingState:
    return model.compute_routing(ids_row[None])


def assert_same_routing(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a != 0, b != 0), "different experts selected"
    assert torch.allclose(a, b, **close("torch", "gates"))


@pytest.fixture(params=[tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def model(request):
    return tenant(11, builder=request.param, top_k=2)


def test_decode_loop_runs_no_router_and_matches_full_recompute(model):
    counter = RouterCounter(model)
    ids = prompts(1, 2, 6)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        assert counter.calls == LAYERS  # one call per layer, for the whole batch
        routing, cache, seq = out.routing, out.past_key_values, ids
        for _ in range(6):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            seq = torch.cat([seq, nxt], dim=1)
            out = model(nxt, routing=routing, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            # Full recomputation of the whole sequence, no cache, same routing.
            full = model(seq, routing=routing, use_cache=False)
            assert torch.allclose(out.logits[:, -1], full.logits[:, -1], **close("torch", "logits"))
            assert torch.equal(out.logits[:, -1].argmax(-1), full.logits[:, -1].argmax(-1))
            assert out.routing is routing  # decode returns the routing it was given
        assert counter.calls == LAYERS, "a decode step ran a router"


def test_generate_routes_once_and_equals_manual_greedy(model):
    counter = RouterCounter(model)
    ids = prompts(2, 2, 5)
    with torch.no_grad():
        seqs, routing = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7,
                                       do_sample=False, return_routing=True, **NO_EOS)
        assert counter.calls == LAYERS, f"generate ran routers {counter.calls} times for {LAYERS} layers"
        assert seqs.shape == (2, 12)
        # generate without the KV cache recomputes everything each step with the recorded routing.
        seqs_nocache = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7,
                                      do_sample=False, use_cache=False, **NO_EOS)
        assert torch.equal(seqs, seqs_nocache)
        # Manual greedy: full recomputation with the prompt's routing at every step.
        expected = model.compute_routing(ids)
        assert_same_routing(routing.gates, expected.gates)
        seq = ids
        for _ in range(7):
            nxt = model(seq, routing=expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(seqs, seq)


def test_decode_uses_the_given_routing(model):
    # Same prompt, another prompt's routing: decode must follow the routing it is given, so
    # the continuation changes (the routing is data, not recomputed).
    ids = prompts(3, 2, 6)
    with torch.no_grad():
        routing = model.compute_routing(ids)
        assert not torch.equal(routing.gates[0] != 0, routing.gates[1] != 0), "pick prompts that route apart"
        swapped = routing.select([1, 0])
        a = model.generate(ids, attention_mask=torch.ones_like(ids), routing=routing, max_new_tokens=6,
                           do_sample=False, **NO_EOS)
        b = model.generate(ids, attention_mask=torch.ones_like(ids), routing=swapped, max_new_tokens=6,
                           do_sample=False, **NO_EOS)
        c = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, **NO_EOS)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_routing_state_with_wrong_batch_is_refused(model):
    ids = prompts(4, 2, 5)
    with torch.no_grad():
        routing = model.compute_routing(ids)
        bad = RoutingState.concat([routing, routing.select([0])])  # 3 rows for a batch of 2
        with pytest.raises(RoutingError, match="3 rows"):
            model(ids, routing=bad)
        with pytest.raises(RoutingError, match="either routing"):
            model(ids, routing=routing, routing_mask=torch.ones_like(ids))


@BUILDERS
def test_beam_search_keeps_each_prompts_routing(builder):
    model = tenant(12, builder=builder, top_k=2)
    counter = RouterCounter(model)
    ids = prompts(5, 2, 6)
    beams = 3
    with torch.no_grad():
        seqs, routing = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=beams,
                                       num_return_sequences=beams, do_sample=False, return_routing=True, **NO_EOS)
        assert counter.calls == LAYERS
        alone = [routed_alone(model, ids[b]).gates[0] for b in range(2)]
        assert not torch.equal(alone[0] != 0, alone[1] != 0), "pick prompts that route apart"
        assert routing.gates.shape == (2 * beams, LAYERS, 7)
        for row in range(2 * beams):
            assert_same_routing(routing.gates[row], alone[row // beams])  # copies sit next to their prompt
        # Each prompt's beams equal the same beam search on that prompt alone.
        for b in range(2):
            solo = model.generate(ids[b:b + 1], attention_mask=torch.ones_like(ids[b:b + 1]), max_new_tokens=5,
                                  num_beams=beams, num_return_sequences=beams, do_sample=False, **NO_EOS)
            assert torch.equal(seqs[b * beams:(b + 1) * beams], solo)
        # A routing given for the 2 prompts is expanded to their beams the same way.
        again = model.generate(ids, attention_mask=torch.ones_like(ids), routing=model.compute_routing(ids),
                               max_new_tokens=5, num_beams=beams, num_return_sequences=beams, do_sample=False,
                               **NO_EOS)
        assert torch.equal(again, seqs)


@BUILDERS
def test_seeded_sampling_equals_manual_sampling_loop(builder):
    model = tenant(13, builder=builder, top_k=2)
    counter = RouterCounter(model)
    ids = prompts(6, 2, 5)
    n, steps = 2, 8
    sample = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=steps, **NO_EOS)
    with torch.no_grad():
        torch.manual_seed(1234)
        seqs, routing = model.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=n,
                                       return_routing=True, **sample)
        assert counter.calls == LAYERS
        for row in range(2 * n):
            assert_same_routing(routing.gates[row], routed_alone(model, ids[row // n]).gates[0])
        # Manual loop: HF's sampling is softmax(float32 logits) -> multinomial, one draw per step.
        torch.manual_seed(1234)
        expanded = ids.repeat_interleave(n, dim=0)
        out = model(expanded, use_cache=True)
        state, cache, seq = out.routing, out.past_key_values, expanded
        for _ in range(steps):
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
            nxt = torch.multinomial(probs, num_samples=1)  # [B, 1]
            seq = torch.cat([seq, nxt], dim=1)
            out = model(nxt, routing=state, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        assert torch.equal(seqs, seq)
        # Same seed, same output; the routing of the other prompt gives another output.
        torch.manual_seed(1234)
        assert torch.equal(model.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=n,
                                          **sample), seqs)
        torch.manual_seed(1234)
        wrong = model.compute_routing(ids).select([1, 0])
        broken = model.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=n, routing=wrong,
                                **sample)
        assert not torch.equal(broken, seqs)


def padded(rows: list[torch.Tensor], side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


@BUILDERS
@pytest.mark.parametrize("pooler", ["attention", "last", "mean", "max"])
def test_left_padding_matches_each_prompt_alone(builder, pooler):
    model = tenant(14, builder=builder, top_k=2, pooler=pooler)
    rows = [prompts(7, 1, 4)[0], prompts(8, 1, 9)[0], prompts(9, 1, 6)[0]]
    ids, mask = padded(rows, "left", pad_id=5)  # a real token id as padding: only the mask may hide it
    with torch.no_grad():
        out = model(ids, mask)
        for i, r in enumerate(rows):
            solo = model(r[None])
            assert_same_routing(out.routing.gates[i], solo.routing.gates[0])
            assert torch.allclose(out.logits[i, -len(r):], solo.logits[0], **close("torch", "logits")), i


@BUILDERS
def test_left_padded_generate_matches_each_prompt_alone(builder):
    model = tenant(15, builder=builder, top_k=2)
    rows = [prompts(10, 1, 3)[0], prompts(11, 1, 7)[0]]
    ids, mask = padded(rows, "left")
    with torch.no_grad():
        seqs, routing = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       return_routing=True, **NO_EOS)
        for i, r in enumerate(rows):
            solo, solo_routing = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                                max_new_tokens=6, do_sample=False, return_routing=True, **NO_EOS)
            assert_same_routing(routing.gates[i], solo_routing.gates[0])
            assert torch.equal(seqs[i, -(len(r) + 6):], solo[0])


@BUILDERS
@pytest.mark.parametrize("pooler", ["attention", "last", "mean", "max"])
def test_right_padding_routing_matches_each_prompt_alone(builder, pooler):
    model = tenant(16, builder=builder, top_k=2, pooler=pooler)
    rows = [prompts(12, 1, 8)[0], prompts(13, 1, 3)[0]]
    ids, mask = padded(rows, "right", pad_id=7)
    with torch.no_grad():
        routing = model.compute_routing(ids, mask)
        for i, r in enumerate(rows):
            assert_same_routing(routing.gates[i], routed_alone(model, r).gates[0])


def test_routing_mask_selects_the_prompt_span():
    # Training: attention covers prompt + response, routing only the prompt span; the routing
    # must equal routing the prompt alone.
    model = tenant(17, top_k=2)
    prompt, response = prompts(14, 1, 5), prompts(15, 1, 4)
    ids = torch.cat([prompt, response], dim=1)
    routing_mask = torch.tensor([[1] * 5 + [0] * 4])
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), routing_mask=routing_mask)
        assert_same_routing(out.routing.gates, model.compute_routing(prompt).gates)
        # And the logits equal a forward that applies that routing to the whole sequence.
        assert torch.allclose(out.logits, model(ids, routing=out.routing).logits, **close("torch", "activations"))


@BUILDERS
def test_left_padded_decode_loop_matches_each_prompt_alone(builder):
    # MiloraModel.forward derives position ids from the mask (real tokens only); a decode
    # loop through it on a left-padded batch must match each prompt decoded alone.
    model = tenant(18, builder=builder, top_k=2)
    rows = [prompts(16, 1, 8)[0], prompts(17, 1, 3)[0]]
    ids, mask = padded(rows, "left")
    with torch.no_grad():
        out = model(ids, mask, use_cache=True)
        routing, cache, seq = out.routing, out.past_key_values, ids
        for _ in range(5):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(nxt, mask, routing=routing, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        for i, r in enumerate(rows):
            solo = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), max_new_tokens=5,
                                  do_sample=False, **NO_EOS)
            assert torch.equal(seq[i, -(len(r) + 5):], solo[0])


@pytest.mark.parametrize("kind", ["switch", "cv2"])
def test_forward_loss_adds_load_balancing_over_layers(kind):
    # loss = lm_loss + lb_coef * mean over layers of L_lb(router probabilities of the prompts).
    model = tenant(19, top_k=2, lb_loss=kind, lb_coef=0.25)
    seen = []
    for r in model.routers:
        r.register_forward_hook(lambda mod, args, out: seen.append(out[1].detach().double().tolist()))
    ids = prompts(18, 4, 6)
    out = model(ids, labels=ids)
    assert len(seen) == LAYERS

    def switch(p):
        e = len(p[0])
        top = [max(range(e), key=lambda i: (row[i], -i)) for row in p]
        return e * sum(sum(t == i for t in top) / len(p) * sum(row[i] for row in p) / len(p) for i in range(e))

    def cv2(p):
        imp = [sum(row[i] for row in p) for i in range(len(p[0]))]
        mean = sum(imp) / len(imp)
        return sum((x - mean) ** 2 for x in imp) / (len(imp) - 1) / mean**2

    fn = switch if kind == "switch" else cv2
    expected_lb = sum(fn(p) for p in seen) / LAYERS
    assert out.lb_loss.item() == pytest.approx(expected_lb, rel=1e-5)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 0.25 * expected_lb, rel=1e-6)
    out.loss.backward()
    assert model.routers[0].weight.grad is not None and model.routers[0].weight.grad.abs().sum() > 0
    # Decode (routing given) runs no router: no load-balancing term.
    assert model(ids, routing=out.routing, labels=ids).lb_loss is None


def test_unrouted_tenant_has_fixed_gates_of_one():
    model = tenant(20, routed=False, target_modules=("q_proj", "v_proj", "down_proj"))
    assert model.routers is None
    ids = prompts(19, 2, 5)
    with torch.no_grad():
        out = model(ids)
        expected = torch.zeros(2, LAYERS, 7)
        expected[:, :, [0, 2, 6]] = 1.0
        assert torch.equal(out.routing.gates, expected)
        assert out.lb_loss is None
        seqs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, **NO_EOS)
        assert seqs.shape == (2, 8)


def test_generate_refuses_partial_prompt_prefill(model):
    # Chunked prefill and a reused cache without routing would route on part of the prompt.
    ids = prompts(20, 1, 8)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with pytest.raises(RoutingError, match="prefill_chunk_size=4"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, prefill_chunk_size=4, **NO_EOS)
        cache = model(ids[:, :5], use_cache=True).past_key_values
        with pytest.raises(RoutingError, match="past_key_values but no routing"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, past_key_values=cache, **NO_EOS)


def test_row_without_prompt_tokens_is_refused(model):
    ids = prompts(21, 2, 4)
    with pytest.raises(RoutingError, match=r"rows \[1\] have no prompt token"):
        model(ids, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
