"""milora-serve under pressure and at run time: overload (429 + Retry-After), no free adapter
slot (503 + Retry-After), client disconnects and timeouts free the row and its KV, tenants
added and removed through the admin endpoint and a watched directory.

Several tests hold the engine's lock for a moment: the driver thread then cannot submit or
step, which makes "the request is still running when X happens" certain rather than a race.
"""

from __future__ import annotations

import shutil
import threading

import pytest

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")
pytest.importorskip("fastapi", reason="milora-serve needs the serve extra")
httpx2 = pytest.importorskip("httpx2")

from milora.serve import ServeConfig, create_app  # noqa: E402
from serve_helpers import TENANTS, ServerThread, tiny_chat_export, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def exported():
    return tiny_chat_export()


def make_client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kw)


def user(text):
    return [{"role": "user", "content": text}]


def engine_of(server):
    return server.app.state.backend.engine


def driver_of(server):
    return server.app.state.backend.driver


def empty(server) -> bool:
    s = engine_of(server).stats()
    return (s["queued"], s["running"], s["kv_reserved_tokens"], s["kv_batch_tokens"], s["tenant_refs"]) == (0,) * 5


def outcome(server, tenant, endpoint, what) -> float:
    value = server.app.state.metrics.registry.get_sample_value(
        "milora_requests_total", {"tenant": tenant, "endpoint": endpoint, "outcome": what})
    return value or 0.0


def in_threads(*calls):
    """Run each call in a thread; returns (threads, results) with results[i] = value or exception."""
    results = [None] * len(calls)

    def run(i, fn):
        try:
            results[i] = fn()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, results


def test_full_queue_is_429_with_retry_after(exported):
    with ServerThread(create_app(exported[1], max_batch=1, max_queue=1)) as server:
        client = make_client(server)
        ask = lambda: client.chat.completions.create(model="alpha", messages=user("w5"), max_tokens=3, temperature=0)  # noqa: E731
        with engine_of(server)._lock:  # the driver stops at its next engine call
            threads, results = in_threads(ask, ask, ask)
            # All three reach the driver while it cannot submit; once released, it submits those it
            # took together before the next step: the first fills the queue (max_queue=1), and at
            # least one other overflows it.
            assert wait_until(lambda: driver_of(server).received == 3)
        for t in threads:
            t.join(60)
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(refused) >= 1 and all(isinstance(r, openai.RateLimitError) or not isinstance(r, Exception)
                                         for r in results)
        err = refused[0]
        assert err.status_code == 429 and err.response.headers["retry-after"] == "1"
        assert err.code == "overloaded" and "max_queue" in err.message
        assert wait_until(lambda: empty(server))


def test_no_free_adapter_slot_is_503_with_retry_after(exported):
    model_dir, out_dir = exported
    with ServerThread(create_app(out_dir, max_batch=2)) as server:
        for t in TENANTS:
            engine_of(server).pin(t)  # all 4 slots pinned
        http = httpx2.post(server.url + "/admin/tenants", json={"name": "extra", "source": str(model_dir / "adapters" / "beta")})
        assert http.status_code == 201
        with pytest.raises(openai.APIStatusError) as err:
            make_client(server).chat.completions.create(model="extra", messages=user("w5"), max_tokens=2)
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"
        assert err.value.code == "no_free_adapter_slot" and "slots" in err.value.message
        engine_of(server).unpin("alpha")
        ask = lambda m: make_client(server).chat.completions.create(  # noqa: E731
            model=m, messages=user("w5"), max_tokens=2, temperature=0).choices[0].message.content
        assert ask("extra") == ask("beta")  # "extra" is beta's adapter, loaded in alpha's slot
        assert wait_until(lambda: empty(server))


def test_client_disconnect_mid_stream_frees_the_row_and_kv(exported):
    with ServerThread(create_app(exported[1], max_batch=2)) as server:
        client = make_client(server)
        stream = client.chat.completions.create(model="gamma", messages=user("w5 w6"), max_tokens=100,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        with engine_of(server)._lock:  # the request cannot finish while the client leaves
            assert engine_of(server).stats()["tenant_refs"] + engine_of(server).stats()["queued"] == 1
            stream.close()
            assert wait_until(lambda: outcome(server, "gamma", "chat", "cancelled") == 1)
        assert wait_until(lambda: empty(server))
        tokens = server.app.state.metrics.registry.get_sample_value("milora_completion_tokens_total",
                                                                    {"tenant": "gamma"})
        assert tokens < 100 and outcome(server, "gamma", "chat", "ok") == 0


def test_client_disconnect_without_streaming_frees_the_row(exported):
    with ServerThread(create_app(exported[1], max_batch=2)) as server:
        body = {"model": "delta", "prompt": "w5 w6", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
        with engine_of(server)._lock:
            threads, results = in_threads(lambda: httpx2.post(server.url + "/v1/completions", json=body, timeout=0.5))
            threads[0].join(30)
            assert isinstance(results[0], httpx2.TimeoutException)  # the client gave up and closed
        assert wait_until(lambda: outcome(server, "delta", "completion", "cancelled") == 1)
        assert wait_until(lambda: empty(server))
        assert outcome(server, "delta", "completion", "ok") == 0


def test_timeout_is_504_and_cancels(exported):
    config = ServeConfig(request_timeout_s=0.3)
    with ServerThread(create_app(exported[1], config=config, max_batch=2)) as server:
        client = make_client(server)
        ask = lambda: client.completions.create(model="alpha", prompt="w5", max_tokens=2,  # noqa: E731
                                                temperature=0).choices[0].text
        before = ask()
        with engine_of(server)._lock:
            threads, results = in_threads(lambda: client.completions.create(model="alpha", prompt="w5", max_tokens=5))
            threads[0].join(30)
        err = results[0]
        assert isinstance(err, openai.APIStatusError) and err.status_code == 504 and err.code == "timeout"
        assert wait_until(lambda: empty(server) and not driver_of(server)._inbox)
        # A request that finishes in time is unaffected.
        assert ask() == before


def test_admin_adds_and_removes_tenants(exported):
    model_dir, out_dir = exported
    with ServerThread(create_app(out_dir, max_batch=2)) as server:
        client, admin = make_client(server), httpx2.Client(base_url=server.url + "/admin")
        ask = lambda m: client.chat.completions.create(model=m, messages=user("w7 w8"), max_tokens=6,  # noqa: E731
                                                       temperature=0).choices[0].message.content
        added = admin.post("/tenants", json={"name": "alpha-copy", "source": str(model_dir / "adapters" / "alpha")})
        assert added.status_code == 201 and added.json()["id"] == "alpha-copy"
        assert "alpha-copy" in [m.id for m in client.models.list().data]
        assert ask("alpha-copy") == ask("alpha")  # the same adapter, loaded at run time
        pack = admin.post("/tenants", json={"name": "beta-pack", "source": str(out_dir / "adapters" / "beta.safetensors")})
        assert pack.status_code == 201 and ask("beta-pack") == ask("beta")
        again = admin.post("/tenants", json={"name": "alpha-copy", "source": str(model_dir / "adapters" / "alpha")})
        assert again.status_code == 409 and again.json()["error"]["code"] == "tenant_exists"
        missing = admin.post("/tenants", json={"name": "x", "source": str(model_dir / "nowhere")})
        assert missing.status_code == 400 and "nowhere" in missing.json()["error"]["message"]
        bad = admin.post("/tenants", json={"name": "../evil", "source": str(model_dir / "adapters" / "alpha")})
        assert bad.status_code == 400 and "invalid" in bad.json()["error"]["message"]
        base = admin.post("/tenants", json={"name": "base", "source": str(model_dir / "adapters" / "alpha")})
        assert base.status_code == 400 and "base model" in base.json()["error"]["message"]
        assert admin.delete("/tenants/alpha-copy").status_code == 200
        with pytest.raises(openai.NotFoundError):
            ask("alpha-copy")
        assert admin.delete("/tenants/alpha-copy").status_code == 404
        assert {t["id"] for t in admin.get("/tenants").json()["tenants"]} == {*TENANTS, "beta-pack"}
        assert wait_until(lambda: empty(server))


def test_admin_token_and_disabled_admin(exported):
    model_dir, out_dir = exported
    source = {"name": "guarded", "source": str(model_dir / "adapters" / "alpha")}
    with ServerThread(create_app(out_dir, config=ServeConfig(admin_token="s3cret"))) as server:
        url = server.url + "/admin/tenants"
        assert httpx2.post(url, json=source).status_code == 401
        wrong = httpx2.post(url, json=source, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert httpx2.post(url, json=source, headers={"Authorization": "Bearer s3cret"}).status_code == 201
    with ServerThread(create_app(out_dir, config=ServeConfig(admin_enabled=False))) as server:
        off = httpx2.post(server.url + "/admin/tenants", json=source)
        assert off.status_code == 403 and off.json()["error"]["code"] == "admin_disabled"


def test_watched_directory_adds_and_removes_tenants(exported, tmp_path):
    model_dir, out_dir = exported
    watch = tmp_path / "watch"
    watch.mkdir()
    config = ServeConfig(watch_dir=watch, watch_interval_s=0.05)
    with ServerThread(create_app(out_dir, config=config, max_batch=2)) as server:
        client = make_client(server)
        models = lambda: {m.id for m in client.models.list().data}  # noqa: E731
        ask = lambda m: client.completions.create(model=m, prompt="w9 w10", max_tokens=6,  # noqa: E731
                                                  temperature=0).choices[0].text
        shutil.copytree(model_dir / "adapters" / "alpha", watch / "fresh")
        shutil.copy(out_dir / "adapters" / "beta.safetensors", watch / "packed.safetensors")
        (watch / "broken.safetensors").write_bytes(b"not a safetensors file")
        shutil.copytree(model_dir / "adapters" / "gamma", watch / ".incoming")  # dot-names are ignored
        assert wait_until(lambda: {"fresh", "packed"} <= models())
        assert ask("fresh") == ask("alpha") and ask("packed") == ask("beta")
        watcher = server.app.state.watcher
        assert wait_until(lambda: "broken" in watcher._refused)
        assert not {"broken", ".incoming", "incoming"} & models()
        shutil.rmtree(watch / "fresh")
        assert wait_until(lambda: "fresh" not in models())
        assert "packed" in models()
        with pytest.raises(openai.NotFoundError):
            ask("fresh")


def test_a_corrupt_tenant_fails_alone_with_a_clean_500(exported, tmp_path):
    """A slot pack full of NaN is refused when added (400 naming the tenant). One whose banks
    turn NaN in memory afterwards: its request ends with 500 numerical_error (no traceback); a
    request of another tenant sent at the same time is answered as usual."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    from milora.format import manifest as mf

    _, out_dir = exported
    pack = load_file(str(out_dir / "adapters" / "beta.safetensors"))
    save_file({k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in pack.items()},
              str(tmp_path / "nan.safetensors"))
    shutil.copy(out_dir / "adapters" / "beta.safetensors", tmp_path / "poison.safetensors")
    with ServerThread(create_app(out_dir, max_batch=4)) as server:
        client = make_client(server)
        refused = httpx2.post(server.url + "/admin/tenants", json={"name": "nan", "source": str(tmp_path / "nan.safetensors")})
        assert refused.status_code == 400 and "NaN" in refused.text and "'nan'" in refused.text
        assert httpx2.post(server.url + "/admin/tenants",
                           json={"name": "poison", "source": str(tmp_path / "poison.safetensors")}).status_code == 201
        engine = engine_of(server)
        with engine._lock:
            slot = engine.tenants.pin("poison")
            engine.backend.banks[mf.lora_b_bank("down_proj")][slot] = np.nan
        ask = lambda m: client.completions.create(model=m, prompt="w5 w6", max_tokens=4, temperature=0)  # noqa: E731
        alone = ask("alpha").choices[0].text
        with engine_of(server)._lock:  # both reach the driver before it can step
            threads, results = in_threads(lambda: ask("poison"), lambda: ask("alpha"))
            assert wait_until(lambda: driver_of(server).received >= 3)
        for t in threads:
            t.join(60)
        bad, good = results
        assert isinstance(bad, openai.InternalServerError) and bad.code == "numerical_error"
        assert "poison" in bad.message and "Traceback" not in bad.response.text
        assert good.choices[0].text == alone
        assert wait_until(lambda: empty(server))


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(exported, monkeypatch):
    with ServerThread(create_app(exported[1], max_batch=2)) as server:
        client = make_client(server)
        ask = lambda: client.completions.create(model="gamma", prompt="w5", max_tokens=4,  # noqa: E731
                                                temperature=0).choices[0].text
        before = ask()
        engine = engine_of(server)
        real_step = engine.step
        calls = {"n": 0}

        def failing_step():
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected onnxruntime failure")
            return real_step()

        monkeypatch.setattr(engine, "step", failing_step)
        with pytest.raises(openai.InternalServerError) as err:
            ask()
        assert err.value.code == "engine_failure" and "injected" in err.value.message
        assert ask() == before  # the next request is served as if nothing had failed
        assert wait_until(lambda: empty(server))
