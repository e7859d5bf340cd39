"""Loopback load test of milora-serve on SmolLM2-135M: concurrent streaming clients against the
HTTP server, next to the runtime driven in-process with the same requests (BENCHMARKS.md).

    python benchmarks/serve_loadtest.py [--clients 32] [--requests 128] [--tokens 32] [--repeats 3]
                                        [--max-batch 8] [--json out.json]

Preparation (cached under $MILORA_CACHE/bench-serve): materialise SmolLM2 (as
`python -m milora.assets smollm2`), write 8 MiLoRA adapters (k=1, rank 16) with random non-zero
weights (speed does not depend on training), export them as 8 tenants with
`python -m milora.export.cli`.

Measurements, interleaved, each in fresh processes:
  inproc  one process: Engine(OUT_DIR), a closed loop of C clients stepping it (each client
          submits its next request when its previous one finishes)
  server  `python -m milora.serve.cli OUT_DIR` in one process, C asyncio clients streaming chat
          completions over 127.0.0.1 in another (they share the machine's cores with the server)
Every request is a chat turn of one of the 8 tenants (round-robin), greedy, ignore_eos, exactly
--tokens tokens, so both modes do the same work. Each process first runs a warm-up of 2*max_batch
requests. Reported: medians over the repeats of tokens/s (all completion tokens / wall time),
p50/p99 latency and time to first token, and the load average before each measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

QUESTIONS = ["Why is the sky blue?", "What is a prime number?", "How do plants make food?",
             "Name three uses of copper.", "What causes the seasons?", "How does a compass work?",
             "Why do we have tides?", "What is photosynthesis for?"]
TENANTS = [f"t{i}" for i in range(8)]


@dataclass
class Sample:
    latency: float  # request sent -> last token
    ttft: float  # request sent -> first token
    tokens: int


def make_requests(n: int, tenants: list[str], tokens: int) -> list[dict]:
    return [{"model": tenants[i % len(tenants)], "tokens": tokens,
             "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (question {i})"}]}
            for i in range(n)]


# ---- the two clients ----

def inproc_clients(engine, reqs: list[dict], clients: int) -> tuple[list[Sample], float]:
    """Closed loop of `clients` clients on one Engine in this process; (samples, wall seconds)."""
    from milora.runtime import SamplingParams

    queues = [reqs[k::clients] for k in range(clients)]
    live, samples = {}, []

    def send(k: int) -> None:
        if queues[k]:
            r = queues[k].pop(0)
            live[k] = engine.submit(r["model"], messages=r["messages"],
                                    params=SamplingParams(max_new_tokens=r["tokens"], ignore_eos=True))

    t0 = time.perf_counter()
    for k in range(clients):
        send(k)
    while live:
        engine.step()
        for k, req in list(live.items()):
            if req.done:
                del live[k]
                if req.status != "finished":
                    raise RuntimeError(f"request failed: {req.error}")
                samples.append(Sample(req.finished_at - req.submitted_at, req.first_token_at - req.submitted_at,
                                      len(req.output_ids)))
                send(k)
    return samples, time.perf_counter() - t0


async def http_clients(url: str, reqs: list[dict], clients: int) -> tuple[list[Sample], float]:
    """`clients` asyncio clients streaming chat completions from url; (samples, wall seconds)."""
    import httpx2

    async def one(http, r) -> Sample:
        body = {"model": r["model"], "messages": r["messages"], "max_tokens": r["tokens"], "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        t0 = time.perf_counter()
        first, tokens = None, 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter()
        return Sample(end - t0, (first or end) - t0, tokens)

    async def client(http, mine, out):
        for r in mine:
            out.append(await one(http, r))

    samples: list[Sample] = []
    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, reqs[k::clients], samples) for k in range(clients)))
        return samples, time.perf_counter() - t0


def summary(samples: list[Sample], wall: float) -> dict:
    lat = sorted(s.latency for s in samples)
    ttft = sorted(s.ttft for s in samples)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"requests": len(samples), "tokens": sum(s.tokens for s in samples), "wall_s": wall,
            "tok_s": sum(s.tokens for s in samples) / wall, "latency_p50": pct(lat, 0.5), "latency_p99": pct(lat, 0.99),
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99)}


# ---- workers (fresh processes) ----

def _cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def worker_inproc(args) -> dict:
    from milora.runtime import Engine

    reqs = make_requests(args.requests, TENANTS, args.tokens)
    with Engine(args.out, max_batch=args.max_batch, max_queue=100000) as engine:
        inproc_clients(engine, make_requests(2 * args.max_batch, TENANTS, args.tokens), args.clients)  # warm-up
        cpu = _cpu(os.getpid())
        result = summary(*inproc_clients(engine, reqs, args.clients))
        result["engine_cpu_s"] = _cpu(os.getpid()) - cpu
    return result


def worker_client(args) -> dict:
    reqs = make_requests(args.requests, TENANTS, args.tokens)
    asyncio.run(http_clients(args.url, make_requests(2 * args.max_batch, TENANTS, args.tokens), args.clients))
    server_cpu, client_cpu = _cpu(args.server_pid), _cpu(os.getpid())
    result = summary(*asyncio.run(http_clients(args.url, reqs, args.clients)))
    result["engine_cpu_s"] = _cpu(args.server_pid) - server_cpu  # the server process: engine + HTTP
    result["client_cpu_s"] = _cpu(os.getpid()) - client_cpu
    return result


def _load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[0] if Path("/proc/loadavg").exists() else "?"


def _worker(mode: str, args, **extra) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--worker", mode, "--result", f.name, "--out", str(args.out),
               "--clients", str(args.clients), "--requests", str(args.requests), "--tokens", str(args.tokens),
               "--max-batch", str(args.max_batch)] + [x for k, v in extra.items() for x in (f"--{k}", str(v))]
        subprocess.run(cmd, check=True)
        return json.loads(Path(f.name).read_text())


def measure_server(args) -> dict:
    import httpx2

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "milora.serve.cli", str(args.out), "--port", str(port),
                               "--max-batch", str(args.max_batch), "--max-queue", "100000", "--log-level", "warning"])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx2.get(url + "/health/ready", timeout=5).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("milora-serve did not become ready")
            time.sleep(0.5)
        return _worker("client", args, url=url, **{"server-pid": server.pid})
    finally:
        server.terminate()
        server.wait(60)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- preparation ----

def prepare(rebuild: bool = False) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from runtime_smollm2 import make_adapters

    from milora.assets import cache_root, smollm2_dir

    base_dir = smollm2_dir()
    root = cache_root() / "bench-serve"
    out = root / "out"
    if rebuild or not (out / "manifest.json").is_file():
        made = make_adapters(base_dir, root, 16, {"milora-k1": {"top_k": 1}})
        names = sorted(made)
        cmd = [sys.executable, "-m", "milora.export.cli", str(base_dir), str(out), "--force", "--quiet"]
        for t, name in zip(TENANTS, names):
            cmd += ["--adapter", f"{t}={made[name]}"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"exported {len(TENANTS)} tenants in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def report(runs: dict[str, list[dict]], args) -> str:
    """Medians per mode, and the server/in-process ratios of each round's adjacent pair (load
    from other jobs drifts between rounds, less within a pair)."""
    results = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "load"} |
               {"load": "/".join(str(r["load"]) for r in rs)} for mode, rs in runs.items()}
    lines = [f"{args.clients} concurrent clients, {args.requests} requests x {args.tokens} tokens, max_batch "
             f"{args.max_batch}, medians of {len(runs['inproc'])} fresh-process runs per mode",
             "", "| mode | tokens/s | latency p50 | latency p99 | TTFT p50 | TTFT p99 | engine-process CPU s "
             "per 1k tokens | load before each run |", "|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['tok_s']:.1f} | {r['latency_p50']:.2f} s | {r['latency_p99']:.2f} s | "
                     f"{1000 * r['ttft_p50']:.0f} ms | {1000 * r['ttft_p99']:.0f} ms | "
                     f"{1000 * r['engine_cpu_s'] / r['tokens']:.1f} | {r['load']} |")
    pairs = list(zip(runs["inproc"], runs["server"]))
    tput = [s["tok_s"] / i["tok_s"] for i, s in pairs]
    cpu = [s["engine_cpu_s"] / i["engine_cpu_s"] for i, s in pairs]
    client = statistics.median(1000 * s["client_cpu_s"] / s["tokens"] for _, s in pairs)
    lines.append(f"\nserver / in-process, per round: throughput {' '.join(f'{x:.2f}' for x in tput)} (median "
                 f"{statistics.median(tput):.2f}); CPU per token of the serving process "
                 f"{' '.join(f'{x:.2f}' for x in cpu)} (median {statistics.median(cpu):.2f}); the HTTP clients "
                 f"used {client:.2f} CPU s per 1k tokens besides")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", choices=["inproc", "client"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--from-json", type=Path, help="print the report of a saved --json file and exit")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        for k in ("clients", "requests", "tokens", "max_batch"):
            setattr(args, k, saved["args"][k])
        print(report(saved["runs"], args))
        return
    if args.worker:
        result = worker_inproc(args) if args.worker == "inproc" else worker_client(args)
        args.result.write_text(json.dumps(result))
        return
    args.out = prepare(args.rebuild)
    runs: dict[str, list[dict]] = {"inproc": [], "server": []}
    for rnd in range(args.repeats):
        for mode in runs:
            load = _load()
            r = _worker("inproc", args) if mode == "inproc" else measure_server(args)
            r["load"] = load
            runs[mode].append(r)
            print(f"round {rnd + 1} {mode}: {r['tok_s']:.1f} tok/s, p50 {r['latency_p50']:.2f} s, "
                  f"TTFT p50 {1000 * r['ttft_p50']:.0f} ms (load {load})", file=sys.stderr)
    print(report(runs, args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs},
                                        indent=1))


if __name__ == "__main__":
    main()
