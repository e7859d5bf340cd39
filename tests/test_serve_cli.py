"""milora-serve's command line (exit status 2 on bad input), the serving stack imports neither
torch nor transformers, and a bounded loopback load test with benchmarks/serve_loadtest.py's
clients (the benchmark's own code, so it cannot rot)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="milora-serve needs the serve extra")

from milora.serve.cli import main  # noqa: E402
from bench_helpers import load_benchmark  # noqa: E402
from serve_helpers import TENANTS, ServerThread, tiny_chat_export  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, message", [
    (["MISSING"], "not a directory"),
    (["OUT", "--max-tokens-limit", "0"], "max_tokens_limit=0"),
    (["OUT", "--watch", "NOWHERE"], "watch directory"),
    (["OUT", "--base-model-id", "alpha"], "base model id"),
    (["OUT", "--ray", "--tenants-per-replica", "9"], "tenants_per_replica=9"),
    (["OUT", "--ray", "--min-replicas", "3", "--max-replicas", "2"], "min_replicas=3"),
])
def test_bad_input_exits_2_without_traceback(tmp_path, capsys, argv, message):
    _, out_dir = tiny_chat_export()
    argv = [str(out_dir) if a == "OUT" else str(tmp_path / a) if a in ("MISSING", "NOWHERE") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_admin_is_disabled_beyond_loopback_without_a_token():
    from milora.serve.cli import build_parser, serve_config

    _, out_dir = tiny_chat_export()
    parse = lambda *a: serve_config(build_parser().parse_args([str(out_dir), *a]))  # noqa: E731
    assert parse().admin_enabled and parse("--host", "::1").admin_enabled
    assert not parse("--host", "0.0.0.0").admin_enabled
    guarded = parse("--host", "0.0.0.0", "--admin-token", "t")
    assert guarded.admin_enabled and guarded.admin_token == "t"


def test_serving_imports_neither_torch_nor_transformers():
    code = ("import sys, milora.serve.app, milora.serve.cli, milora.serve.ray_serve, milora.serve.watch; "
            "bad = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"serving imported {proc.stdout.strip()} {proc.stderr[-500:]}"


def test_runtime_does_not_import_the_serving_stack():
    code = ("import sys, milora.runtime.engine, milora.runtime.cli; "
            "bad = [m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'ray') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"the runtime imported {proc.stdout.strip()} {proc.stderr[-500:]}"


def test_loopback_load_test_bounded():
    """48 streamed requests from 12 concurrent clients over HTTP, and the same requests in-process:
    every request answered with exactly its tokens, and the engine empty afterwards."""
    from milora.runtime import Engine
    from milora.serve import create_app

    bench = load_benchmark("serve_loadtest")
    _, out_dir = tiny_chat_export()
    reqs = bench.make_requests(48, list(TENANTS), 6)
    with ServerThread(create_app(out_dir, max_batch=4)) as server:
        samples, wall = asyncio.run(bench.http_clients(server.url, reqs, 12))
        stats = server.app.state.backend.engine.stats()
    summary = bench.summary(samples, wall)
    assert summary["requests"] == 48 and summary["tokens"] == 48 * 6
    assert all(s.tokens == 6 and 0 < s.ttft <= s.latency for s in samples)
    assert (stats["queued"], stats["running"], stats["kv_reserved_tokens"], stats["tenant_refs"]) == (0, 0, 0, 0)
    with Engine(out_dir, max_batch=4) as engine:
        samples, wall = bench.inproc_clients(engine, reqs, 12)
    assert len(samples) == 48 and all(s.tokens == 6 for s in samples)
