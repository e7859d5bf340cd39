"""Scale-out on Ray Serve: runtime replicas with tenant-aware routing behind the same HTTP API.

    MiloraIngress (1 replica): create_app(backend=RayBackend(...)), the FastAPI app of
        milora-serve, deployed with serve.ingress. It forwards each request to MiloraRuntime with
        handle.options(multiplexed_model_id=<tenant>), so Ray routes it to a replica that already
        holds the tenant's adapter (the request's "model"; clients need no special header).
    MiloraRuntime (N replicas, fixed or autoscaled): each one an Engine + EngineDriver over
        OUT_DIR. serve.multiplexed keeps an LRU of tenants per replica (pinned into adapter
        slots); a tenant evicted from the LRU is unpinned.

If a replica dies, a request that has sent nothing to its client yet is sent again (to another
replica); one that already streamed tokens ends with a clean error (503, replica_lost).

    from milora.serve.ray_serve import RayOptions, run
    run("out/", RayOptions(min_replicas=1, max_replicas=4), ServeConfig(), {"max_batch": 8})
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milora.errors import MiloraError, TenantError
from milora.serve.backend import Backend, LocalBackend, check_tenant_name
from milora.serve.driver import Delta, GenerateCall
from milora.serve.errors import ReplicaLostError, ServeError
from milora.serve.watch import scan

log = logging.getLogger("milora.serve")

APP_NAME = "milora"


@dataclass
class RayOptions:
    replicas: int | None = None  # fixed count; None: autoscale between min_replicas and max_replicas
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0  # autoscaling target per replica
    max_ongoing_requests: int = 64  # per replica; beyond, Ray queues at the ingress
    tenants_per_replica: int | None = None  # LRU size (default: the export's adapter slots)
    adapters_dir: Path | None = None
    replica_cpus: float = 1.0
    address: str | None = None  # an existing cluster; None: start one on loopback
    retries: int = 1  # times a request is re-sent after its replica died (before any token was sent)

    def check(self, slots: int) -> int:
        """Validate; returns the LRU size per replica."""
        if self.replicas is not None and self.replicas < 1:
            raise ServeError(f"replicas={self.replicas}; expected >= 1")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ServeError(f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas}; expected "
                             "0 <= min <= max and max >= 1")
        if self.adapters_dir is not None and not Path(self.adapters_dir).is_dir():
            raise ServeError(f"adapters directory {self.adapters_dir} does not exist")
        n = self.tenants_per_replica if self.tenants_per_replica is not None else slots
        if not 1 <= n <= slots:
            raise ServeError(f"tenants_per_replica={n}; this export has {slots} adapter slot(s) per replica, so "
                             f"expected 1..{slots} (re-export with more --slots to hold more)")
        return n


def _adapter_source(adapters_dir: Path | None, name: str) -> Path | None:
    if adapters_dir is None:
        return None
    found = scan(Path(adapters_dir)).get(name)
    return found[0] if found else None


class _Lease:
    """A tenant held by a replica's multiplexing LRU: pinned in an adapter slot until Ray
    evicts it (Ray calls __del__ on eviction; it may run again at garbage collection)."""

    def __init__(self, backend: LocalBackend, name: str):
        self.backend, self.name, self.released = backend, name, False

    def __del__(self):
        if not self.released:
            self.released = True
            try:
                self.backend.engine.unpin(self.name)
            except (MiloraError, AttributeError):  # removed meanwhile, or the engine is closed
                pass


class RuntimeReplica:
    """Body of the MiloraRuntime deployment (runtime_deployment() adds serve.multiplexed)."""

    def __init__(self, out_dir: str, engine_options: dict[str, Any], base_model_id: str, default_max_tokens: int,
                 adapters_dir: str | None):
        from ray import serve

        _replica_grpc_on_loopback()
        self.backend = LocalBackend(out_dir, base_model_id=base_model_id, default_max_tokens=default_max_tokens,
                                    **engine_options)
        self.backend.driver.start()
        self.adapters_dir = Path(adapters_dir) if adapters_dir else None
        ctx = serve.get_replica_context()
        self.replica_id = getattr(getattr(ctx, "replica_id", None), "unique_id", None) or str(ctx.replica_tag)
        self.backend.replica_id = self.replica_id
        self.loads = 0
        self._load_lock = threading.Lock()

    async def _load_tenant(self, name: str) -> _Lease:
        def load():
            with self._load_lock:
                if not self.backend.has_model(name):
                    source = _adapter_source(self.adapters_dir, name)
                    if source is None:
                        raise TenantError(f"unknown tenant {name!r}; this deployment serves the export's tenants "
                                          "and the adapters in its --adapters-dir")
                    self.backend.add_tenant_now(check_tenant_name(name, self.backend.base_model_id), source)
                self.backend.engine.pin(name)
                self.loads += 1
        await asyncio.to_thread(load)
        return _Lease(self.backend, name)

    def _stats(self) -> dict[str, Any]:
        s = self.backend.stats().get(self.replica_id, {})
        s["tenant_loads"] = self.loads
        return s

    async def generate(self, call: GenerateCall):
        """Async generator: first {"replica", "prompt_tokens", "stats"} or {"error"}, then Deltas."""
        try:
            if call.tenant is not None:
                await self.get_tenant(call.tenant)  # the multiplexed loader (runtime_deployment)
            stream = await self.backend.generate(call)
        except MiloraError as exc:
            yield {"error": exc}
            return
        try:
            yield {"replica": self.replica_id, "prompt_tokens": stream.prompt_tokens,
                   "stats": await asyncio.to_thread(self._stats)}
            async for delta in stream:
                yield delta
        finally:
            stream.cancel()  # a no-op once finished; frees the row when the caller went away

    async def stats(self) -> dict[str, Any]:
        return {self.replica_id: await asyncio.to_thread(self._stats)}

    def check_health(self) -> None:
        if not self.backend.driver.alive:
            raise RuntimeError("the engine thread of this replica is not running")


def runtime_deployment(opts: RayOptions, lru_size: int):
    from ray import serve

    class MiloraRuntime(RuntimeReplica):
        @serve.multiplexed(max_num_models_per_replica=lru_size)
        async def get_tenant(self, model_id: str) -> _Lease:
            return await self._load_tenant(model_id)

    scaling: dict[str, Any]
    if opts.replicas is not None:
        scaling = {"num_replicas": opts.replicas}
    else:
        scaling = {"autoscaling_config": {"min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
                                          "target_ongoing_requests": opts.target_ongoing_requests}}
    return serve.deployment(MiloraRuntime, name="MiloraRuntime", max_ongoing_requests=opts.max_ongoing_requests,
                            ray_actor_options={"num_cpus": opts.replica_cpus}, health_check_period_s=5, **scaling)


def _lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


class RayGeneration:
    """A request running on a MiloraRuntime replica (see Generation in milora.serve.backend)."""

    def __init__(self, backend: "RayBackend", call: GenerateCall, gen, first: dict[str, Any]):
        self.backend, self.call, self._gen = backend, call, gen
        self.prompt_tokens, self.replica = first["prompt_tokens"], first["replica"]
        self._sent = False
        self._retries = backend.retries

    def __aiter__(self) -> "RayGeneration":
        return self

    async def __anext__(self) -> Delta:
        while True:
            try:
                d = await self._gen.__anext__()
            except self.backend.lost as exc:
                self.backend.replica_stats.pop(self.replica, None)  # it is gone: stop reporting it
                if self._sent or self._retries <= 0:
                    return Delta(done=True, finish_reason="error", error=ReplicaLostError(
                        f"the replica serving this request ({self.replica}) died ({type(exc).__name__}) after part "
                        "of the answer was sent; the answer is incomplete: send the request again"))
                self._retries -= 1
                self.backend.count_retry()
                self._gen, first = await self.backend._start(self.call)
                self.replica = first["replica"]
                continue
            if d.text or d.logprobs:
                self._sent = True
            return d

    def cancel(self) -> None:
        self._gen.cancel()


class RayBackend(Backend):
    """The ingress side: forwards requests to MiloraRuntime replicas, keyed on the tenant."""

    admin_supported = False

    def __init__(self, runtime_handle, out_dir: str | Path, adapters_dir: str | Path | None = None,
                 base_model_id: str = "base", retries: int = 1):
        from milora.format.manifest import read_manifest

        super().__init__(base_model_id)
        self.handle = runtime_handle
        self.tenants = set(read_manifest(Path(out_dir))["tenants"])
        self.adapters_dir = Path(adapters_dir) if adapters_dir else None
        self.retries = retries
        self.replica_stats: dict[str, dict[str, Any]] = {}
        self.metrics = None  # set by create_app's caller to count retries
        self.lost = _lost_errors()

    def model_ids(self) -> list[str]:
        extra = set(scan(self.adapters_dir)) if self.adapters_dir is not None else set()
        return sorted(self.tenants | extra)

    def has_model(self, name: str) -> bool:
        return name in self.tenants or _adapter_source(self.adapters_dir, name) is not None

    def stats(self) -> dict[str, dict[str, Any]]:
        return dict(self.replica_stats)

    def count_retry(self) -> None:
        if self.metrics is not None:
            self.metrics.retries.inc()

    async def _start(self, call: GenerateCall):
        gen = self.handle.options(multiplexed_model_id=call.tenant or "", stream=True).generate.remote(call)
        try:
            first = await gen.__anext__()
        except asyncio.CancelledError:  # timeout or client gone before the replica answered
            gen.cancel()
            raise
        if "error" in first:
            raise first["error"]
        self.replica_stats[first["replica"]] = first["stats"]
        return gen, first

    async def generate(self, call: GenerateCall) -> RayGeneration:
        for attempt in range(self.retries + 1):
            try:
                gen, first = await self._start(call)
                return RayGeneration(self, call, gen, first)
            except self.lost as exc:
                if attempt == self.retries:
                    raise ReplicaLostError(f"no runtime replica could take the request ({type(exc).__name__}); "
                                           "retry in a few seconds while Ray replaces the replica") from None
                self.count_retry()
        raise ServeError("unreachable")


def ingress_deployment():
    from ray import serve

    @serve.ingress()
    class MiloraIngress:
        def __init__(self, runtime, out_dir: str, adapters_dir: str | None, config, retries: int):
            _replica_grpc_on_loopback()
            self.backend = RayBackend(runtime, out_dir, adapters_dir, config.base_model_id, retries)
            self.config = config

        def __serve_build_asgi_app__(self):
            from milora.serve.app import create_app

            app = create_app(backend=self.backend, config=self.config)
            self.backend.metrics = app.state.metrics
            return app

    return serve.deployment(MiloraIngress, name="MiloraIngress", num_replicas=1,
                            ray_actor_options={"num_cpus": 0})


def build_app(out_dir: str | Path, opts: RayOptions, config, engine_options: dict[str, Any]):
    """The Ray Serve application: MiloraIngress in front of MiloraRuntime."""
    from milora.format.manifest import read_manifest

    out_dir = Path(out_dir).resolve()
    if config.watch_dir is not None:
        raise ServeError("--watch is for a single server; on Ray put adapters in --adapters-dir (read by every "
                         "replica on demand)")
    slots = read_manifest(out_dir)["slots"] - 1
    lru = opts.check(slots)
    engine_options = dict(engine_options)
    if engine_options.get("threads") is None:
        engine_options["threads"] = max(1, int(opts.replica_cpus))
    adapters = str(Path(opts.adapters_dir).resolve()) if opts.adapters_dir else None
    runtime = runtime_deployment(opts, lru).bind(str(out_dir), engine_options, config.base_model_id,
                                                 config.default_max_tokens, adapters)
    return ingress_deployment().bind(runtime, str(out_dir), adapters, config, opts.retries)


LOOPBACK_ENV = {
    # Ray picks the loopback address as the node's address (read when ray is first imported).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # No auth token written under the home directory.
    "RAY_AUTH_MODE": "disabled",
    # Read by our replicas (the workers inherit it): see _replica_grpc_on_loopback.
    "MILORA_RAY_LOOPBACK": "1",
}


def loopback_env() -> None:
    """Set LOOPBACK_ENV in this process (call before Ray starts; before `import ray` if possible)."""
    os.environ.update(LOOPBACK_ENV)
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray already imported: the constant was read from the old environment
        constants.ENABLE_RAY_CLUSTER = False


def _replica_grpc_on_loopback() -> None:
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to "[::]:0" (every
    interface) with no setting to change it. On a loopback cluster (MILORA_RAY_LOOPBACK=1),
    rewrite that one bind to 127.0.0.1; runs in the replica before Serve starts that server."""
    if os.environ.get("MILORA_RAY_LOOPBACK") != "1":
        return
    try:
        from ray.serve._private import replica as serve_replica
    except ImportError:
        return
    bind = getattr(serve_replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "milora_loopback", False):
        return

    def loopback_bind(server, address):
        return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

    loopback_bind.milora_loopback = True
    serve_replica.add_port_to_grpc_server = loopback_bind


def start_local_ray(num_cpus: int | None = None, temp_dir: str | None = None,
                    object_store_memory: int = 500 * 1024 ** 2, log_to_driver: bool = True) -> None:
    """Start a one-machine Ray cluster kept on loopback (no dashboard, no token files)."""
    loopback_env()
    import ray

    kwargs: dict[str, Any] = {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False,
                              "object_store_memory": object_store_memory, "configure_logging": False,
                              "log_to_driver": log_to_driver}
    if temp_dir is not None:
        kwargs["_temp_dir"] = str(temp_dir)
    ray.init(**kwargs)


def deploy(out_dir: str | Path, opts: RayOptions, config, engine_options: dict[str, Any], host: str = "127.0.0.1",
           port: int = 8000, temp_dir: str | None = None) -> None:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and deploy the application."""
    if opts.address is None:
        loopback_env()  # before Ray is imported
    import ray
    from ray import serve

    app = build_app(out_dir, opts, config, engine_options)  # validates before Ray starts
    if opts.address is None:
        start_local_ray(temp_dir=temp_dir)
    else:
        ray.init(address=opts.address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")


def shutdown() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def run(out_dir: str | Path, opts: RayOptions, config, engine_options: dict[str, Any], host: str = "127.0.0.1",
        port: int = 8000) -> None:
    """deploy(), then serve until interrupted (Ctrl-C), then stop Serve and Ray."""
    deploy(out_dir, opts, config, engine_options, host, port)
    log.info("milora-serve on Ray Serve: http://%s:%d/v1 (Ctrl-C to stop)", host, port)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
