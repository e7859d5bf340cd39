"""The runtime against the PyTorch reference, and its scheduling, tenant and KV bookkeeping."""

from __future__ import annotations

import pytest

from milora.errors import CapacityError, ManifestError, TenantError
from milora.runtime import Engine, SamplingParams
from runtime_helpers import random_prompts, reference_greedy

TENANTS = ("alpha", "beta", "gamma", "delta")
NEW = 6
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_any_export):
    return tiny_any_export


@pytest.fixture(scope="module")
def references(exported):
    model_dir, _ = exported
    prompts = {t: random_prompts(i, (5, 1, 9)) for i, t in enumerate(TENANTS)}
    return prompts, {(t, i): reference_greedy(model_dir, t, p, NEW)
                     for t, ps in prompts.items() for i, p in enumerate(ps)}


def greedy(n=NEW):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def check_equal(ref, got, label) -> bool:
    """Tokens equal the reference's; False (not compared) only when the reference met a near-tie
    on the way, where rounding may legitimately pick the other token. Callers assert that most
    comparisons happened, so a filter that leaves nothing compared fails."""
    tokens, margin = ref
    if margin < NEAR_TIE:
        return False
    assert got == tokens, f"{label}: runtime {got} != reference {tokens}"
    return True


@pytest.mark.parametrize("tenant", TENANTS)
def test_each_tenant_alone_equals_reference(exported, references, tenant):
    _, out_dir = exported
    prompts, refs = references
    engine = Engine(out_dir, max_batch=1)
    compared = [check_equal(refs[(tenant, i)], engine.generate(tenant, prompt_ids=p, params=greedy()).output_ids,
                            f"{tenant} prompt {i}") for i, p in enumerate(prompts[tenant])]
    assert sum(compared) >= 2, f"{tenant}: only {sum(compared)} of {len(compared)} prompts compared (near-ties)"


@pytest.mark.parametrize("max_batch", [3, 8])
def test_mixed_batches_equal_reference(exported, references, max_batch):
    """Batch invariance: rows of different tenants and lengths, joining as others finish."""
    _, out_dir = exported
    prompts, refs = references
    engine = Engine(out_dir, max_batch=max_batch)
    order = [(t, i) for i in range(3) for t in TENANTS]  # interleave tenants
    # Different lengths, so rows leave at different steps and others join (fixed per key).
    reqs = {key: engine.submit(key[0], prompt_ids=prompts[key[0]][key[1]], params=greedy(NEW - (n % 3)))
            for n, key in enumerate(order)}
    engine.run_until_done()
    compared = 0
    for key, req in reqs.items():
        tokens, margin = refs[key]
        if margin >= NEAR_TIE:
            assert req.output_ids == tokens[: len(req.output_ids)], f"{key}"
            compared += 1
    assert compared >= len(reqs) - 2, f"only {compared} of {len(reqs)} requests compared (near-ties)"
    assert engine.stats()["running"] == 0


def test_empty_after_every_run(exported):
    _, out_dir = exported
    engine = Engine(out_dir, max_batch=4)
    for round_ in range(2):
        reqs = [engine.submit(t, prompt_ids=p, params=greedy(3 + round_))
                for t, p in zip(TENANTS, random_prompts(round_, (4, 7, 2, 5)))]
        engine.run_until_done()
        assert all(r.status == "finished" for r in reqs)
        s = engine.stats()
        assert (s["queued"], s["running"], s["kv_reserved_tokens"], s["kv_batch_tokens"], s["tenant_refs"]) == (0,) * 5


def test_queueing_at_kv_capacity(exported):
    _, out_dir = exported
    prompt = random_prompts(3, (6,))[0]
    engine = Engine(out_dir, max_batch=8, kv_budget_tokens=len(prompt) + 4)  # room for one request
    a = engine.submit("alpha", prompt_ids=prompt, params=greedy(4))
    b = engine.submit("beta", prompt_ids=prompt, params=greedy(4))
    engine.step()
    assert a.status == "running" and b.status == "queued"
    while not a.done:
        engine.step()
    engine.run_until_done()
    assert b.status == "finished" and len(b.output_ids) == 4
    with pytest.raises(CapacityError, match="KV budget"):
        engine.submit("alpha", prompt_ids=prompt, params=greedy(50))


def test_cancellation_frees_everything(exported):
    _, out_dir = exported
    engine = Engine(out_dir, max_batch=4)
    ps = random_prompts(5, (5, 8, 3))
    running = engine.submit("alpha", prompt_ids=ps[0], params=greedy(20))
    other = engine.submit("beta", prompt_ids=ps[1], params=greedy(5))
    engine.step()
    queued = engine.submit("gamma", prompt_ids=ps[2], params=greedy(5))
    engine.cancel(running)
    engine.cancel(queued)
    assert running.status == queued.status == "cancelled"
    engine.run_until_done()
    assert other.status == "finished" and len(other.output_ids) == 5
    s = engine.stats()
    assert s["tenant_refs"] == 0 and s["kv_reserved_tokens"] == 0 and s["running"] == 0


def test_eviction_pinning_and_runtime_added_tenants(exported, references, tmp_path):
    """Adapter directories added at run time (no re-export) share 4 slots with the packs; LRU
    eviction reloads them exactly."""
    model_dir, out_dir = exported
    prompts, refs = references
    engine = Engine(out_dir, max_batch=2)
    engine.remove_tenant("gamma")
    engine.add_tenant("gamma", model_dir / "adapters" / "gamma")  # from the adapter directory
    engine.pin("alpha")
    compared = 0
    for t in ("beta", "gamma", "delta", "beta", "gamma"):
        req = engine.generate(t, prompt_ids=prompts[t][0], params=greedy())
        compared += check_equal(refs[(t, 0)], req.output_ids, t)
        assert "alpha" in engine.tenants.slots()
    assert compared >= 4
    with pytest.raises(TenantError, match="unknown tenant"):
        engine.submit("nobody", prompt_ids=[5])


def test_all_slots_busy_is_an_error_not_a_hang(exported, tmp_path):
    model_dir, out_dir = exported
    engine = Engine(out_dir, max_batch=8)
    engine.add_tenant("extra", model_dir / "adapters" / "alpha")
    for t in TENANTS:
        engine.pin(t)  # 4 usable slots, all pinned
    req = engine.submit("extra", prompt_ids=[5, 6, 7], params=greedy(2))
    engine.run_until_done()
    assert req.status == "failed" and isinstance(req.error, TenantError)


def test_seeded_sampling_is_batch_invariant(exported):
    _, out_dir = exported
    p = random_prompts(9, (6,))[0]
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=123, ignore_eos=True)
    alone = Engine(out_dir).generate("beta", prompt_ids=p, params=params).output_ids
    engine = Engine(out_dir)
    others = [engine.submit(t, prompt_ids=q, params=SamplingParams(max_new_tokens=5, temperature=1.0, seed=i))
              for i, (t, q) in enumerate(zip(TENANTS, random_prompts(1, (3, 9, 4, 2))))]
    mixed = engine.submit("beta", prompt_ids=p, params=params)
    engine.run_until_done()
    assert mixed.output_ids == alone and all(o.done for o in others)


def test_text_prompts_stop_strings_and_streaming(exported):
    _, out_dir = exported
    engine = Engine(out_dir)
    free = engine.generate("alpha", "w5 w17 w40", params=greedy(6))
    words = free.text.split()
    assert len(words) == 6
    stop = words[2]
    req = engine.submit("alpha", "w5 w17 w40", params=SamplingParams(max_new_tokens=6, ignore_eos=True, stop=(stop,)))
    chunks = list(engine.stream(req))
    assert req.finish_reason == "stop" and stop not in req.text
    assert "".join(chunks) == req.text and free.text.startswith(req.text)


def test_tampered_or_missing_out_dir_is_refused(exported, tmp_path):
    import shutil

    _, out_dir = exported
    copy = tmp_path / "copy"
    shutil.copytree(out_dir, copy)
    pack = next((copy / "adapters").iterdir())
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0xFF
    pack.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="changed"):
        Engine(copy)
    with pytest.raises(ManifestError, match="no manifest.json|not a directory"):
        Engine(tmp_path / "nowhere")


def test_base_model_rows_use_slot_zero(exported):
    """tenant None serves the bare base model, also mixed with tenants; equals the plain HF model."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, out_dir = exported
    p = random_prompts(11, (7,))[0]
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([p])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
    engine = Engine(out_dir)
    base = engine.submit(None, prompt_ids=p, params=greedy())
    other = engine.submit("alpha", prompt_ids=p, params=greedy())
    engine.run_until_done()
    assert base.output_ids == ref and other.output_ids != ref
    assert engine.stats()["tenant_refs"] == 0


def test_close_cancels_and_releases(exported):
    _, out_dir = exported
    with Engine(out_dir) as engine:
        req = engine.submit("alpha", prompt_ids=[5, 6, 7], params=greedy(8))
        engine.step()
    assert req.status == "cancelled" and engine.backend is None


def test_export_without_adapters_is_the_plain_base_model(tmp_path):
    """No tenants: no LoRA op is lowered (the benchmarks' floor), and the runtime's greedy
    tokens equal plain HF generate."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    from helpers import tiny_llama
    from milora.export.exporter import export
    from runtime_helpers import add_word_tokenizer

    model_dir = tmp_path / "model"
    tiny_llama(0).save_pretrained(str(model_dir))
    add_word_tokenizer(model_dir)
    manifest = export(model_dir, tmp_path / "out", progress=False)
    assert manifest["lora_lowering"] == "none" and manifest["tenants"] == {}
    graph = onnx.load(str(tmp_path / "out" / "decode.onnx"), load_external_data=False).graph
    assert not [n for n in graph.node if "/lora/" in n.name and n.op_type != "Identity"]
    p = random_prompts(12, (6,))[0]
    ids = torch.tensor([p])
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval().generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
        pad_token_id=0)[0, len(p):].tolist()
    assert Engine(tmp_path / "out").generate(None, prompt_ids=p, params=greedy()).output_ids == ref


def test_token_times_and_update_callback(exported):
    """on_update fires once per accepted token and once more when the request ends; the
    per-token timestamps are monotonic, one per output token."""
    _, out_dir = exported
    seen = []
    with Engine(out_dir, max_batch=2) as engine:
        req = engine.submit("alpha", prompt_ids=[5, 6, 7], params=greedy(5),
                            on_update=lambda r: seen.append((len(r.output_ids), r.done)))
        other = engine.submit("beta", prompt_ids=[8, 9], params=greedy(3))
        engine.run_until_done()
    assert [n for n, _ in seen] == [1, 2, 3, 4, 5] and seen[-1][1] and not any(d for _, d in seen[:-1])
    assert len(req.token_times) == 5 and req.token_times == sorted(req.token_times)
    assert req.token_times[0] >= req.first_token_at
    assert other.on_update is None and len(other.token_times) == 3


def test_engine_takes_a_backend_it_does_not_build(exported):
    """Engine receives its backend (an instance or a factory of the opened Bundle) and drives
    it only through the Backend interface: a recording wrapper sees prefill, bind_rows once
    per membership change, decode per step, and close."""
    from milora.runtime.ort_backend import open_backend

    _, out_dir = exported
    calls = []

    class Recording:
        def __init__(self, bundle):
            self.inner = open_backend(bundle.root, bundle.manifest)
            self.slots, self.num_layers = self.inner.slots, self.inner.num_layers

    def delegate(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            return getattr(self.inner, name)(*args, **kwargs)
        return method

    for name in ("write_slot", "clear_slot", "check_slots", "prefill", "bind_rows", "decode", "extend",
                 "empty_kv", "merge", "keep_rows", "repeat_rows", "close"):
        setattr(Recording, name, delegate(name))
    with Engine(out_dir, backend=Recording) as engine:
        engine.generate("alpha", prompt_ids=[5, 6, 7], params=greedy(3))
    assert calls.count("prefill") == 1 and calls.count("decode") == 2 and calls[-1] == "close"
    assert calls.count("bind_rows") == 3  # empty batch, the row joins, the row leaves
    with pytest.raises(Exception, match="does not implement"):
        Engine(out_dir, backend=object())
