"""milora-serve on a local Ray Serve cluster (2 runtime replicas, each keeping at most 2 of the
4 tenants): every tenant answered with the runtime's own answers, tenant affinity seen in
/metrics, a replica killed mid-run, and every Ray process listening on loopback only.
Skipped, with the reason, where Ray is not installed or cannot start."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")
pytest.importorskip("fastapi", reason="milora-serve needs the serve extra")
httpx2 = pytest.importorskip("httpx2")

from milora.runtime import Engine, SamplingParams  # noqa: E402
from milora.serve import ServeConfig  # noqa: E402
from serve_helpers import TENANTS, tiny_chat_export, wait_until  # noqa: E402

MODELS = ["base", *TENANTS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from milora.serve import ray_serve as rs

    rs.loopback_env()  # before ray is imported
    pytest.importorskip("ray", reason="Ray Serve is in the ray extra (pip install milora[ray])")
    from ray import serve

    _, out_dir = tiny_chat_export()
    try:
        rs.start_local_ray(num_cpus=2, temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - any failure to start Ray is a reason to skip
        pytest.skip(f"Ray cannot start on this machine: {type(exc).__name__}: {exc}")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = rs.build_app(out_dir, rs.RayOptions(replicas=2, tenants_per_replica=2, replica_cpus=0.5),
                           ServeConfig(), {"max_batch": 2})
        serve.run(app, name=rs.APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}", out_dir
    finally:
        rs.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster[0] + "/v1", api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)


def user(text):
    return [{"role": "user", "content": text}]


def metric(url: str, name: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx2.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def served_by(client, model: str) -> str:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=user("w5 w6"), max_tokens=2,
                                                          temperature=0)
    raw.parse()
    return raw.headers["x-milora-replica"]


def test_every_ray_process_listens_on_loopback_only(cluster):
    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "found no listening socket of the Ray processes"
    exposed = []
    for c in listening:
        ip = ipaddress.ip_address(c.laddr.ip)
        ip = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
        if not ip.is_loopback:
            exposed.append((psutil.Process(c.pid).name(), c.laddr))
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"


def test_requests_of_many_tenants_all_answered(cluster, client):
    url, out_dir = cluster
    jobs = [(i, MODELS[i % 5], f"w{5 + i % 4} w{30 + i % 9}", 3 + i % 4) for i in range(30)]
    with Engine(out_dir, max_batch=1) as engine:
        refs = {(m, p, n): engine.generate(None if m == "base" else m, messages=user(p),
                                           params=SamplingParams(max_new_tokens=n)).text for _, m, p, n in jobs}
    assert [m.id for m in client.models.list().data] == ["base", *sorted(TENANTS)]
    got, errors = {}, []

    def worker(mine):
        for i, m, p, n in mine:
            try:
                got[i] = client.chat.completions.create(model=m, messages=user(p), max_tokens=n,
                                                        temperature=0).choices[0].message.content
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append((i, exc))

    threads = [threading.Thread(target=worker, args=(jobs[k::6],)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == len(jobs)
    assert all(got[i] == refs[(m, p, n)] for i, m, p, n in jobs)


def test_tenant_affinity_in_metrics(cluster, client):
    """After routing settles, each tenant's requests go to one replica and no replica reloads a
    tenant (each keeps 2 of the 4: requests routed blindly would keep evicting)."""
    url, _ = cluster
    previous = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # warm up until a whole round lands where the last one did
        current = {t: served_by(client, t) for t in TENANTS}
        if current == previous:
            break
        previous = current
        time.sleep(1)
    requests_before = metric(url, "milora_replica_requests_total")
    loads_before = sum(metric(url, "milora_tenant_loads").values())
    for _ in range(3):
        for t in TENANTS:
            served_by(client, t)
    requests_after = metric(url, "milora_replica_requests_total")
    per_tenant: dict[str, set[str]] = {}
    for key, value in requests_after.items():
        labels = dict(key)
        if labels["tenant"] in TENANTS and value > requests_before.get(key, 0):
            per_tenant.setdefault(labels["tenant"], set()).add(labels["replica"])
    assert set(per_tenant) == set(TENANTS)
    assert all(len(replicas) == 1 for replicas in per_tenant.values()), per_tenant
    assert len(set().union(*per_tenant.values())) == 2  # both replicas serve
    assert sum(metric(url, "milora_tenant_loads").values()) == loads_before


def test_a_replica_killed_mid_run(cluster, client):
    """SIGKILL one replica while it streams: each request either completes (re-sent to another
    replica if it had not sent any text yet) or ends with a clean replica_lost error; no hang, no
    500; afterwards every tenant is served again."""
    url, _ = cluster

    def replica_pids():
        for t in TENANTS:  # each replica reports its pid with its answers
            served_by(client, t)
        return {dict(k)["replica"]: int(dict(k)["pid"]) for k in metric(url, "milora_replica_info")}

    pids = wait_until(lambda: len(replica_pids()) == 2 and replica_pids(), timeout=60, interval=0.5)
    assert pids and len(pids) == 2
    victim = served_by(client, TENANTS[0])
    retries_before = sum(metric(url, "milora_replica_retries_total").values())
    streaming = threading.Event()  # set when text of a request on the victim reached its client
    results: dict[int, tuple] = {}

    def stream(i):
        replica = None
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=TENANTS[i % 4], messages=user(f"w{5 + i % 50}"), max_tokens=120, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            replica = raw.headers["x-milora-replica"]
            usage = None
            for chunk in raw.parse():
                if replica == victim and chunk.choices and chunk.choices[0].delta.content:
                    streaming.set()
                usage = chunk.usage or usage
            results[i] = ("ok", replica, usage.completion_tokens)
        except openai.APIError as exc:
            results[i] = ("error", replica, f"{getattr(exc, 'code', None)}: {exc.message}")

    # 40 requests x 120 tokens, 2 rows at a time per replica: the victim still has running and
    # queued requests when the first of its texts reaches a client.
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    assert streaming.wait(60)
    os.kill(pids[victim], signal.SIGKILL)
    for t in threads:
        t.join(180)
    assert len(results) == 40, "a request hung after its replica was killed"
    for i, (kind, replica, detail) in results.items():
        if kind == "ok":
            assert detail == 120, (i, detail)
        else:
            assert replica == victim and re.match(r"replica_lost: .*died", detail), (i, detail)
    failed = sum(kind == "error" for kind, _, _ in results.values())
    retried = sum(metric(url, "milora_replica_retries_total").values()) - retries_before
    assert failed + retried >= 1, "every request of the killed replica had finished before the kill"
    # The deployment recovers: every tenant is served again (by the survivor or the replacement).
    assert wait_until(lambda: all(_answers(client, t) for t in TENANTS), timeout=60, interval=1)


def _answers(client, model) -> bool:
    try:
        return bool(client.chat.completions.create(model=model, messages=user("w5"), max_tokens=2).choices)
    except openai.APIError:
        return False
