"""milora-serve through the official openai client on 127.0.0.1: models, chat, completions,
streaming, logprobs, errors in OpenAI's shape, and answers equal to the runtime's own."""

from __future__ import annotations

import json
import threading

import pytest

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")
pytest.importorskip("fastapi", reason="milora-serve needs the serve extra")

from milora.runtime import Engine, SamplingParams  # noqa: E402
from milora.serve import ServeConfig, create_app  # noqa: E402
from serve_helpers import TENANTS, ServerThread, tiny_chat_export  # noqa: E402

MAX = 8


@pytest.fixture(scope="module")
def exported():
    return tiny_chat_export()


@pytest.fixture(scope="module")
def server(exported):
    _, out_dir = exported
    with ServerThread(create_app(out_dir, config=ServeConfig(max_tokens_limit=100, max_body_bytes=4096),
                                 max_batch=4)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         _strict_response_validation=True)


@pytest.fixture(scope="module")
def runtime(exported):
    with Engine(exported[1], max_batch=1) as engine:
        yield engine


def user(text):
    return [{"role": "user", "content": text}]


def test_models_lists_every_tenant_and_the_base(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "base" and sorted(ids[1:]) == sorted(TENANTS)
    assert client.models.retrieve("gamma").id == "gamma"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nobody")
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize("model", ["base", *TENANTS])
def test_chat_greedy_equals_the_runtime(client, runtime, model):
    messages = [{"role": "system", "content": "w30 w31"}, {"role": "user", "content": "w5 w17 w40"}]
    got = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX, temperature=0)
    ref = runtime.generate(None if model == "base" else model, messages=messages,
                           params=SamplingParams(max_new_tokens=MAX))
    choice = got.choices[0]
    assert choice.message.content == ref.text and choice.message.role == "assistant"
    assert got.usage.completion_tokens == len(ref.output_ids)
    assert got.usage.prompt_tokens == len(ref.prompt_ids)
    assert choice.finish_reason == {"length": "length", "eos": "stop", "stop": "stop"}[ref.finish_reason]
    assert got.model == model


def test_tenants_answer_differently(client):
    texts = {t: client.chat.completions.create(model=t, messages=user("w9 w10 w11"), max_tokens=MAX,
                                               temperature=0).choices[0].message.content for t in TENANTS}
    assert len(set(texts.values())) > 1


def test_completions_from_token_ids_and_text_with_logprobs(client, runtime):
    ids = [7, 19, 33, 4]
    got = client.completions.create(model="beta", prompt=ids, max_tokens=MAX, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    ref = runtime.generate("beta", prompt_ids=ids,
                           params=SamplingParams(max_new_tokens=MAX, logprobs=3, ignore_eos=True))
    c = got.choices[0]
    assert c.text == ref.text and c.finish_reason == "length"
    assert c.logprobs.tokens == [f"w{t}" for t in ref.output_ids]
    assert c.logprobs.token_logprobs == pytest.approx([lp for lp, _ in ref.logprobs])
    assert [list(d) for d in c.logprobs.top_logprobs] == [[f"w{i}" for i, _ in top] for _, top in ref.logprobs]
    text = client.completions.create(model="beta", prompt=" ".join(f"w{t}" for t in ids), max_tokens=MAX,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert text.choices[0].text == ref.text


def test_chat_logprobs(client, runtime):
    got = client.chat.completions.create(model="alpha", messages=user("w5 w6"), max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=2)
    ref = runtime.generate("alpha", messages=user("w5 w6"), params=SamplingParams(max_new_tokens=4, logprobs=2))
    content = got.choices[0].logprobs.content
    assert [c.token for c in content] == [f"w{t}" for t in ref.output_ids]
    assert [c.logprob for c in content] == pytest.approx([lp for lp, _ in ref.logprobs[:len(content)]])
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_streaming_chat_equals_the_whole_answer(client):
    kw = dict(model="delta", messages=user("w12 w13 w14"), max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_streaming_completion_and_stop_strings(server, runtime):
    # Not strict: the SDK types a legacy completion chunk's finish_reason as never null, but
    # OpenAI's API (and this server) send null until the last chunk.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    free = runtime.generate("gamma", "w5 w6 w7", params=SamplingParams(max_new_tokens=MAX, ignore_eos=True))
    stop = free.text.split()[3]
    chunks = list(client.completions.create(model="gamma", prompt="w5 w6 w7", max_tokens=MAX, temperature=0,
                                            stop=[stop], stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks)
    assert stop not in text and free.text.startswith(text) and chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_equals_the_runtime(client, runtime):
    kw = dict(model="alpha", messages=user("w5 w6"), max_tokens=MAX, temperature=0.9, top_p=0.95, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    ref = runtime.generate("alpha", messages=user("w5 w6"),
                           params=SamplingParams(max_new_tokens=MAX, temperature=0.9, top_p=0.95, seed=1234))
    assert a == b == ref.text


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 2}, "n"),
    ({"max_tokens": 1000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"extra_body": {"tools": []}}, "tools"),
    ({"messages": [{"role": "wizard", "content": "w5"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
])
def test_bad_fields_are_400_naming_the_field(client, kwargs, param):
    args = {"model": "alpha", "messages": user("w5")} | kwargs
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**args)
    assert err.value.status_code == 400 and err.value.param == param
    assert err.value.body["message"] and err.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nobody", messages=user("w5"))
    assert err.value.code == "model_not_found" and "nobody" in err.value.message


def test_prompt_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alpha", prompt=" ".join(["w5"] * 120), max_tokens=50)
    assert err.value.code == "context_length_exceeded" and "context" in err.value.message


def test_raw_http_errors_keep_the_openai_shape(server):
    import httpx2

    with httpx2.Client(base_url=server.url, timeout=30) as http:
        cases = [
            http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
            http.post("/v1/completions", json={"model": "alpha", "prompt": "w5 " * 3000}),  # > max_body_bytes
            http.post("/v1/completions", json={"model": "alpha", "prompt": [999, 5]}),  # outside the vocabulary
            http.get("/v1/nothing-here"),
            http.get("/v1/chat/completions"),
        ]
    assert [r.status_code for r in cases] == [400, 413, 400, 404, 405]
    for r in cases:
        body = r.json()
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
        assert "Traceback" not in r.text
    assert "vocabulary" in cases[2].json()["error"]["message"]


def test_health_readiness_and_metrics(server, client):
    import httpx2
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="gamma", prompt="w5", max_tokens=2, temperature=0)
    assert httpx2.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx2.get(server.url + "/health/ready")
    assert ready.status_code == 200 and ready.json()["models"] == 5
    text = httpx2.get(server.url + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    names = {n for n, _ in samples}
    for name in ("milora_queue_depth", "milora_running_rows", "milora_slots_in_use", "milora_slots_total",
                 "milora_tokens_per_second", "milora_kv_reserved_tokens", "milora_requests_total",
                 "milora_time_to_first_token_seconds_count", "milora_request_seconds_count"):
        assert name in names, name
    assert samples[("milora_slots_total", (("replica", "local"),))] == 4
    ok = samples[("milora_requests_total", (("endpoint", "completion"), ("outcome", "ok"), ("tenant", "gamma")))]
    assert ok >= 1
    assert samples[("milora_running_rows", (("replica", "local"),))] == 0


def test_many_clients_at_once_equal_the_runtime(server, client, runtime, exported):
    """16 threads x 4 requests of every tenant and the base model, streamed or not: each answer
    equals the runtime's answer for the same request alone (continuous batching does not change
    answers), and the engine is empty afterwards."""
    models = ["base", *TENANTS]
    jobs = [(i, models[i % 5], f"w{5 + i % 7} w{20 + i % 11} w{40 + i % 13}", 3 + i % 6, i % 2 == 0)
            for i in range(64)]
    refs = {}
    for _, model, prompt, n, _ in jobs:
        if (model, prompt, n) not in refs:
            refs[(model, prompt, n)] = runtime.generate(None if model == "base" else model, messages=user(prompt),
                                                        params=SamplingParams(max_new_tokens=n)).text
    got, errors = {}, []

    def worker(mine):
        try:
            for i, model, prompt, n, stream in mine:
                kw = dict(model=model, messages=user(prompt), max_tokens=n, temperature=0)
                if stream:
                    got[i] = "".join(c.choices[0].delta.content or "" for c in
                                     client.chat.completions.create(**kw, stream=True))
                else:
                    got[i] = client.chat.completions.create(**kw).choices[0].message.content
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(jobs[k::16],)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == len(jobs)
    for i, model, prompt, n, _ in jobs:
        assert got[i] == refs[(model, prompt, n)], (i, model)
    stats = server.app.state.backend.engine.stats()
    assert (stats["queued"], stats["running"], stats["kv_reserved_tokens"], stats["tenant_refs"]) == (0, 0, 0, 0)


def test_chat_needs_a_chat_template(tmp_path):
    """An export whose tokenizer has no chat template answers chat with a 400 that says so."""
    import shutil

    from runtime_helpers import export_tiny

    _, out_dir = export_tiny(tmp_path)
    with ServerThread(create_app(out_dir, max_batch=2)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="alpha", messages=user("w5"))
        assert err.value.code == "no_chat_template" and "/v1/completions" in err.value.message
        # greedy, so the answer does not depend on the sampler's seed (a sampled EOS would leave it empty)
        assert c.completions.create(model="alpha", prompt="w5", max_tokens=2, temperature=0).choices[0].text
    shutil.rmtree(tmp_path / "out")


def test_a_bad_out_dir_fails_at_creation(tmp_path):
    from milora.errors import ManifestError
    from milora.serve.errors import ServeError

    with pytest.raises(ManifestError, match="not a directory"):
        create_app(tmp_path / "missing")
    with pytest.raises(ServeError, match="exactly one"):
        create_app()
    with pytest.raises(ServeError, match="max_tokens_limit"):
        ServeConfig(max_tokens_limit=0)
    assert json.dumps(ServeConfig().__dict__, default=str)
