"""The bad-input matrix, runtime rows (docs/errors.md, "Runtime inputs"): each bad request is
refused with a typed error that says what was wrong, the value seen and what was expected,
before anything reaches onnxruntime, and the engine keeps serving every other request."""

from __future__ import annotations

import numpy as np
import pytest

from milora.errors import CapacityError, NumericalError, OverloadError, RequestError, TenantError
from milora.format import manifest as mf
from milora.runtime import Engine, SamplingParams
from milora.runtime.sampling import SamplingError
from runtime_helpers import random_prompts

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export


@pytest.fixture
def engine(exported):
    with Engine(exported[1], max_batch=4) as e:
        yield e


def still_serving(engine: Engine) -> None:
    """A good request after the bad one completes, and the engine is back to empty."""
    req = engine.generate("alpha", prompt_ids=[5, 6, 7], params=GREEDY)
    assert req.status == "finished" and len(req.output_ids) == 4
    s = engine.stats()
    assert (s["queued"], s["running"], s["kv_reserved_tokens"], s["tenant_refs"]) == (0, 0, 0, 0)


def test_unknown_tenant(engine):
    with pytest.raises(TenantError, match=r"unknown tenant 'nobody'.*serves: alpha, beta, delta, gamma"):
        engine.submit("nobody", prompt_ids=[5])
    still_serving(engine)


@pytest.mark.parametrize("kwargs", [{"prompt": ""}, {"prompt_ids": []}])
def test_empty_prompt(engine, kwargs):
    with pytest.raises(RequestError, match="empty after tokenization; give at least one token"):
        engine.submit("alpha", **kwargs)
    still_serving(engine)


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "w5", "prompt_ids": [5]}])
def test_prompt_arguments_not_exactly_one(engine, kwargs):
    with pytest.raises(RequestError, match="give exactly one"):
        engine.submit("alpha", **kwargs)
    still_serving(engine)


def test_prompt_longer_than_the_context(engine):
    context = engine.max_context  # 128 for the tiny model
    with pytest.raises(CapacityError, match=rf"prompt of {context} tokens \+ max_new_tokens 4 exceeds the model's "
                                            rf"context of {context}; shorten the prompt"):
        engine.submit("alpha", prompt_ids=[5] * context, params=GREEDY)
    still_serving(engine)


@pytest.mark.parametrize("ids, seen", [([5, 96, 7], r"\[96\]"), ([5, -1], r"\[-1\]"), ([5, 10**12], r"\[1000000000000\]")])
def test_token_ids_out_of_range(engine, ids, seen):
    with pytest.raises(RequestError, match=rf"outside the vocabulary, e.g. {seen}; expected ids in 0..95"):
        engine.submit("beta", prompt_ids=ids)
    still_serving(engine)


@pytest.mark.parametrize("ids", [[5, 2.5], ["w5"], [True, 5]])
def test_token_ids_not_integers(engine, ids):
    with pytest.raises(RequestError, match="prompt_ids must be"):
        engine.submit("beta", prompt_ids=ids)
    still_serving(engine)


@pytest.mark.parametrize("slot", [-1, 5, 99])
def test_tenant_slot_out_of_range_is_refused_before_onnxruntime(engine, slot, monkeypatch):
    """-1 would silently read the last slot's tenant through ONNX Gather's index wrapping."""
    def no_run(*args, **kwargs):
        raise AssertionError("onnxruntime must not be reached")

    monkeypatch.setattr(engine.backend, "_run", no_run)
    with pytest.raises(RequestError, match=rf"tenant slot\(s\) \[{slot}\] out of range; this export has slots 0..4"):
        engine.backend.prefill([[5, 6]], [slot])
    kv = engine.backend.empty_kv()
    with pytest.raises(RequestError, match="out of range"):
        engine.backend.decode(np.array([5]), kv, engine.backend.bind_rows(np.array([slot]), np.zeros((1, 2, 7), np.float32)))
    monkeypatch.undo()
    still_serving(engine)


@pytest.mark.parametrize("field, value, expected", [
    ("max_new_tokens", 0, "an integer >= 1"), ("max_new_tokens", True, "an integer >= 1"),
    ("temperature", -0.5, "a finite number >= 0"), ("temperature", float("nan"), "a finite number >= 0"),
    ("top_k", -1, "an integer >= 0"), ("top_p", 0.0, r"a number in \(0, 1\]"), ("top_p", 1.5, r"a number in \(0, 1\]"),
    ("repetition_penalty", float("inf"), "a finite number > 0"), ("seed", -3, r"None or an integer in \[0, 2\*\*63\)"),
    ("logprobs", 21, "None or an integer in 0..20"), ("ignore_eos", "yes", "True or False"),
])
def test_invalid_sampling_parameters(field, value, expected):
    with pytest.raises(SamplingError, match=rf"{field}=.* is invalid; expected {expected}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("stop", [[""], [3], ["ok", None]])
def test_invalid_stop_strings(stop):
    with pytest.raises(SamplingError, match="expected non-empty strings"):
        SamplingParams(stop=stop)


def test_too_many_requests(exported):
    with Engine(exported[1], max_batch=2, max_queue=3) as engine:
        queued = [engine.submit("alpha", prompt_ids=p, params=GREEDY) for p in random_prompts(1, (3, 4, 5))]
        with pytest.raises(OverloadError, match=r"3 requests are waiting \(max_queue 3\); retry later"):
            engine.submit("beta", prompt_ids=[5, 6])
        engine.run_until_done()
        assert all(r.status == "finished" for r in queued)
        still_serving(engine)


def test_kv_exhausted_waits_or_is_refused(exported):
    """A request that can never fit the KV budget is refused at once; one that fits later
    waits in the queue and completes."""
    with Engine(exported[1], max_batch=4, kv_budget_tokens=12) as engine:
        with pytest.raises(CapacityError, match="needs 14 KV tokens but the runtime's KV budget is 12"):
            engine.submit("alpha", prompt_ids=[5] * 10, params=GREEDY)
        a = engine.submit("alpha", prompt_ids=[5] * 6, params=GREEDY)
        b = engine.submit("beta", prompt_ids=[6] * 6, params=GREEDY)
        engine.step()
        assert (a.status, b.status) == ("running", "queued")
        engine.run_until_done()
        assert a.status == b.status == "finished"
        still_serving(engine)


def test_cancelled_requests(engine):
    ps = random_prompts(2, (4, 5, 6))
    running = engine.submit("alpha", prompt_ids=ps[0], params=SamplingParams(max_new_tokens=30, ignore_eos=True))
    other = engine.submit("beta", prompt_ids=ps[1], params=GREEDY)
    engine.step()
    queued = engine.submit("gamma", prompt_ids=ps[2], params=GREEDY)
    stream = engine.stream(running)
    next(stream)
    engine.cancel(running)
    engine.cancel(queued)
    engine.cancel(running)  # twice: a no-op
    assert list(stream) == [] or running.done
    assert running.finish_reason == queued.finish_reason == "cancelled"
    engine.run_until_done()
    assert other.status == "finished"
    still_serving(engine)


def test_corrupt_tenant_in_memory_fails_only_its_own_rows(engine):
    """NaN reaches a slot's banks behind the loaders' backs (memory corruption, a bug): that
    tenant's requests fail with NumericalError naming it; the neighbour's tokens are the same
    as when it runs alone."""
    prompt = [9, 41, 2, 77, 13, 60]
    alone = engine.generate("beta", prompt_ids=prompt, params=GREEDY).output_ids
    slot = engine.tenants.pin("alpha")
    engine.backend.banks[mf.lora_b_bank("down_proj")][slot] = np.nan
    engine.backend.banks[mf.ROUTER_WEIGHT][slot] = np.nan
    bad = engine.submit("alpha", prompt_ids=[5, 17, 33], params=GREEDY)
    good = engine.submit("beta", prompt_ids=prompt, params=GREEDY)
    engine.run_until_done()
    assert bad.status == "failed" and isinstance(bad.error, NumericalError)
    assert "tenant 'alpha'" in str(bad.error) and "other requests are unaffected" in str(bad.error)
    assert good.status == "finished" and good.output_ids == alone
    with pytest.raises(NumericalError, match="tenant 'alpha'"):
        engine.generate("alpha", prompt_ids=[5, 6], params=GREEDY)
    engine.unpin("alpha")
    engine.remove_tenant("alpha")
    assert engine.stats()["tenant_refs"] == 0
