"""milora-serve: an OpenAI-compatible HTTP server over an export directory (thin layer over
milora.serve.create_app and milora.serve.ray_serve).

    milora-serve OUT_DIR [--host 127.0.0.1] [--port 8000] [--watch DIR] [--admin-token TOKEN]
    milora-serve OUT_DIR --ray [--replicas 2 | --min-replicas 1 --max-replicas 4] [--adapters-dir DIR]

Bad input (a missing or tampered OUT_DIR, bad options) prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from milora.errors import MiloraError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="milora-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="directory written by milora-export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--base-model-id", default="base", help="model id of the bare base model (default 'base')")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    t = p.add_argument_group("tenants at run time")
    t.add_argument("--watch", type=Path, help="directory of adapters: NAME/ or NAME.safetensors appearing -> added, "
                   "removed -> removed")
    t.add_argument("--watch-interval", type=float, default=2.0, help="seconds between scans of --watch (default 2)")
    t.add_argument("--admin-token", default=os.environ.get("MILORA_ADMIN_TOKEN"),
                   help="token for POST/DELETE /admin/tenants (default: $MILORA_ADMIN_TOKEN). Without one the admin "
                   "endpoints are open on a loopback --host and disabled on any other")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-body-bytes", type=int, default=1 << 20)
    lim.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    lim.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    lim.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cancelled")
    lim.add_argument("--max-queue", type=int, default=256,
                     help="requests waiting beyond this are refused with 429 and Retry-After (default 256)")
    r = p.add_argument_group("runtime")
    r.add_argument("--max-batch", type=int, default=8)
    r.add_argument("--kv-budget-tokens", type=int)
    r.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    r.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated onnxruntime providers")
    r.add_argument("--no-verify", action="store_true", help="skip the sha256 check of OUT_DIR's files")
    r.add_argument("--share-weights", action="store_true", help="load the weights once for both graphs")
    r.add_argument("--no-huge-pages", action="store_true", help="leave the packed weights in 4 KB pages (docs/runtime.md)")
    ray = p.add_argument_group("Ray Serve (pip install milora[ray]; docs/serving.md)")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas with tenant-aware routing")
    ray.add_argument("--ray-address", help="an existing Ray cluster (e.g. 'auto'); default: start one on loopback")
    ray.add_argument("--replicas", type=int, help="fixed number of runtime replicas")
    ray.add_argument("--min-replicas", type=int, default=1, help="autoscaling lower bound (default 1)")
    ray.add_argument("--max-replicas", type=int, default=2, help="autoscaling upper bound (default 2)")
    ray.add_argument("--tenants-per-replica", type=int, help="tenants each replica keeps loaded (LRU; default: "
                     "its adapter slots)")
    ray.add_argument("--adapters-dir", type=Path, help="adapters beyond the export's, NAME/ or NAME.safetensors, "
                     "loaded by the replica that gets their requests")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    return p


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_config(args):
    from milora.serve.app import ServeConfig

    admin_enabled = bool(args.admin_token) or _loopback(args.host)
    if not admin_enabled:
        logging.getLogger("milora.serve").warning(
            "--host %s is not loopback and no --admin-token was given: /admin/tenants is disabled", args.host)
    return ServeConfig(base_model_id=args.base_model_id, max_body_bytes=args.max_body_bytes,
                       max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                       request_timeout_s=args.request_timeout, admin_enabled=admin_enabled,
                       admin_token=args.admin_token or None, watch_dir=args.watch, watch_interval_s=args.watch_interval)


def engine_options(args) -> dict:
    return {"max_batch": args.max_batch, "kv_budget_tokens": args.kv_budget_tokens, "threads": args.threads,
            "providers": args.providers.split(","), "verify": not args.no_verify,
            "share_weights": args.share_weights, "max_queue": args.max_queue,
            "huge_pages": not args.no_huge_pages}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = serve_config(args)
        if args.ray:
            from milora.serve.ray_serve import RayOptions, run

            run(args.out_dir, RayOptions(replicas=args.replicas, min_replicas=args.min_replicas,
                                         max_replicas=args.max_replicas, tenants_per_replica=args.tenants_per_replica,
                                         adapters_dir=args.adapters_dir, replica_cpus=args.replica_cpus,
                                         address=args.ray_address),
                config, engine_options(args), host=args.host, port=args.port)
            return 0
        import uvicorn

        from milora.serve.app import create_app

        app = create_app(args.out_dir, config=config, **engine_options(args))
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    except MiloraError as exc:
        print(f"milora-serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
