"""Soak: 1,000 requests with random tenants, lengths and cancellations from 16 client threads
sharing one engine. Every request ends finished or cancelled exactly as its client asked;
adapter slots, KV reservations and tenant reference counts return to their initial state;
resident memory growth after warm-up is reported and stays under 5%."""

from __future__ import annotations

import random
import threading

import psutil
import pytest

from helpers import tenant
from milora.format.config import MiloraConfig
from milora.runtime import Engine, SamplingParams

CLIENTS = 16
REQUESTS = 1000
WARMUP = 100
TENANTS = [None, "alpha", "beta", "gamma", "delta", "eps", "zeta"]  # 6 tenants for 4 slots: evictions


@pytest.fixture(scope="module", params=["portable", "fused"])
def out_dir(request, tmp_path_factory):
    """Each graph flavour's tiny export (the fused backend keeps KV in preallocated buffers
    that grow: its memory must settle too), with two more tenants than slots."""
    import functools

    from helpers import tiny_llama

    fused = request.param == "fused"
    _, out = request.getfixturevalue("tiny_fused_export" if fused else "tiny_export")
    root = tmp_path_factory.mktemp("soak")
    builder = functools.partial(tiny_llama, hidden=64 if fused else 32)
    for i, name in enumerate(("eps", "zeta")):
        tenant(60 + i, builder=builder, config=MiloraConfig(rank=2, alpha=4, top_k=2)).save_adapter(root / name)
    return root, out


def _client(engine: Engine, seed: int, count: int, outcomes: list, errors: list) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(count):
            name = rng.choice(TENANTS)
            cancel_after = rng.randint(0, 2) if rng.random() < 0.25 else None
            n = rng.randint(1, 8) if cancel_after is None else rng.randint(24, 40)
            req = engine.submit(name, prompt_ids=[rng.randint(3, 95) for _ in range(rng.randint(1, 20))],
                                params=SamplingParams(max_new_tokens=n, ignore_eos=True))
            asked = False
            while not req.done:
                engine.step()
                if cancel_after is not None and not asked and len(req.output_ids) >= cancel_after:
                    engine.cancel(req)
                    asked = True
            outcomes.append((req.status, asked, len(req.output_ids), n))
    except Exception as exc:  # noqa: BLE001 - reported by the test below, with its thread
        errors.append(repr(exc))


def _run(engine: Engine, per_client: int, seed: int) -> list:
    outcomes, errors = [], []
    threads = [threading.Thread(target=_client, args=(engine, seed + c, per_client, outcomes, errors))
               for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    return outcomes


def test_soak_1000_requests_16_threads(out_dir):
    root, out = out_dir
    process = psutil.Process()
    with Engine(out, max_batch=8, kv_budget_tokens=8 * 40) as engine:
        for name in ("eps", "zeta"):
            engine.add_tenant(name, root / name)
        initial = engine.stats()
        _run(engine, WARMUP // CLIENTS + 1, seed=1000)  # warm-up: sessions, arenas, caches
        rss_before = process.memory_info().rss
        outcomes = _run(engine, (REQUESTS + CLIENTS - 1) // CLIENTS, seed=0)
        rss_after = process.memory_info().rss
        final = engine.stats()
    assert len(outcomes) >= REQUESTS
    for status, asked, got, n in outcomes:
        if asked:  # cancelled, unless it had already finished when the cancel came
            assert status == "cancelled" or (status == "finished" and got == n)
        else:
            assert status == "finished" and got == n
    assert sum(asked and status == "cancelled" for status, asked, _, _ in outcomes) > 100
    for key in ("queued", "running", "kv_reserved_tokens", "kv_batch_tokens", "tenant_refs"):
        assert final[key] == initial[key] == 0, key
    assert len(final["loaded_tenants"]) <= engine_slots(out) - 1
    growth = (rss_after - rss_before) / rss_before
    cancelled = sum(status == "cancelled" for status, _, _, _ in outcomes)
    print(f"\nsoak: {len(outcomes)} requests from {CLIENTS} threads, {cancelled} cancelled; RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MiB ({100 * growth:+.2f}%)")
    assert growth < 0.05


def engine_slots(out) -> int:
    from milora.format.manifest import read_manifest

    return read_manifest(out)["slots"]
