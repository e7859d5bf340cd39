"""The milora-serve HTTP API (FastAPI): OpenAI-style completions for many tenants of one base
model, health, Prometheus metrics and tenant administration.

    app = create_app("out/")                      # one Engine, stepped by one background thread
    uvicorn.run(app, host="127.0.0.1", port=8000)

The same factory serves behind Ray Serve (create_app(backend=RayBackend(...)), see
milora.serve.ray_serve). Every error is answered in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from milora.errors import MiloraError
from milora.serve.backend import Backend, Generation, LocalBackend
from milora.serve.errors import ApiError, ServeError, from_milora, not_ready
from milora.serve.metrics import UNKNOWN, ServeMetrics
from milora.serve.protocol import ChatCompletionRequest, CompletionRequest, ResponseBuilder, parse

log = logging.getLogger("milora.serve")


@dataclass
class ServeConfig:
    """Server limits and options (milora-serve's flags)."""

    base_model_id: str = "base"  # the model id of the bare base model (no adapter)
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none (clamped to the context)
    request_timeout_s: float = 600.0
    retry_after_s: int = 1
    admin_enabled: bool = True
    admin_token: str | None = None  # when set, /admin/* needs "Authorization: Bearer TOKEN"
    watch_dir: Path | None = None  # adapters appearing / disappearing here are added / removed
    watch_interval_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens_limit", "default_max_tokens", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServeError(f"{name}={value!r} is invalid; expected an integer >= 1")
        for name in ("request_timeout_s", "watch_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ServeError(f"{name}={value!r} is invalid; expected a number of seconds > 0")
        if self.watch_dir is not None and not Path(self.watch_dir).is_dir():
            raise ServeError(f"watch directory {self.watch_dir} does not exist; create it or drop --watch")


def _json_error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class _BodyLimit:
    """Refuse request bodies larger than the limit (413), by Content-Length or while reading."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, f"the request body has {size} bytes or more; this server accepts at most {self.limit} "
                        "(--max-body-bytes)", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await _json_error(self._too_large(int(length)))(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large(seen)
            return message

        await self.app(scope, limited, send)


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body has been read, so only a disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(out_dir: str | Path | None = None, *, backend: Backend | None = None,
               config: ServeConfig | None = None, **engine_options) -> FastAPI:
    """The HTTP app over OUT_DIR (a LocalBackend: one Engine, opened now, so a bad directory
    fails here with a typed error) or over a given backend. engine_options go to Engine
    (max_batch, kv_budget_tokens, threads, providers, max_queue, share_weights, huge_pages,
    verify)."""
    cfg = config or ServeConfig()
    if (out_dir is None) == (backend is None):
        raise ServeError("create_app needs exactly one of out_dir (an export directory) or backend")
    if backend is None:
        backend = LocalBackend(out_dir, base_model_id=cfg.base_model_id, default_max_tokens=cfg.default_max_tokens,
                               **engine_options)
    elif engine_options:
        raise ServeError(f"engine options {sorted(engine_options)} only apply with out_dir")
    be: Backend = backend
    metrics = ServeMetrics(be.stats)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await be.start()
        watcher = None
        if cfg.watch_dir is not None:
            from milora.serve.watch import TenantWatcher

            watcher = TenantWatcher(cfg.watch_dir, be, cfg.watch_interval_s)
            watcher.start()
        app.state.watcher = watcher
        try:
            yield
        finally:
            if watcher is not None:
                watcher.stop()
            await be.close()

    app = FastAPI(title="milora-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend, app.state.metrics, app.state.config = be, metrics, cfg
    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)

    # ---- errors: always OpenAI's shape, never a traceback ----

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _json_error(exc)

    @app.exception_handler(MiloraError)
    async def _milora_error(request: Request, exc: MiloraError):
        return _json_error(from_milora(exc, cfg.retry_after_s))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        what = {404: f"no route {request.method} {request.url.path}; see docs/serving.md for the endpoints",
                405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _json_error(ApiError(exc.status_code, what, code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
        loc = ".".join(str(x) for x in err.get("loc", ()))
        return _json_error(ApiError(400, f"{loc}: {err.get('msg')}", param=loc or None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _json_error(ApiError(500, f"internal error ({type(exc).__name__}); the server's log has the details",
                                    "server_error", code="internal_error"))

    # ---- health, metrics, models ----

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        ok, reason = be.ready()
        if not ok:
            raise not_ready(reason, cfg.retry_after_s)
        return {"status": "ready", "models": len(be.model_ids()) + 1}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE_LATEST)

    def _model(mid: str) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": started, "owned_by": "milora"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model(m) for m in [cfg.base_model_id, *be.model_ids()]]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str):
        _tenant(model)
        return _model(model)

    def _tenant(model: str) -> str | None:
        """The tenant a model id names (None: the base model), or a 404."""
        if model == cfg.base_model_id:
            return None
        if be.has_model(model):
            return model
        raise ApiError(404, f"the model {model!r:.80} does not exist on this server; GET /v1/models lists the "
                       f"tenants (and {cfg.base_model_id!r} for the base model)", param="model",
                       code="model_not_found")

    # ---- completions ----

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, "chat", ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, "completion", CompletionRequest)

    async def _complete(request: Request, kind: str, model_cls) -> Response:
        t0 = time.perf_counter()
        body = parse(model_cls, await request.body())
        label = body.model if body.model == cfg.base_model_id or be.has_model(body.model) else UNKNOWN
        try:
            tenant = _tenant(body.model)
            call = body.to_call(tenant, cfg.max_tokens_limit)
            ok, reason = be.ready()
            if not ok:
                raise not_ready(reason, cfg.retry_after_s)
            gen = await asyncio.wait_for(be.generate(call), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            metrics.requests.labels(label, kind, "timeout").inc()
            raise _timeout() from None
        except (ApiError, MiloraError) as exc:
            err = from_milora(exc, cfg.retry_after_s)
            metrics.requests.labels(label, kind, f"rejected_{err.status}").inc()
            raise err from None
        metrics.replica_requests.labels(gen.replica, label).inc()
        metrics.prompt_tokens.labels(label).inc(gen.prompt_tokens)
        want_lp = bool(body.logprobs) if kind == "chat" else body.logprobs is not None
        builder = ResponseBuilder(kind, body.model, want_lp)
        headers = {"x-milora-replica": gen.replica}
        run = _Run(gen, label, kind, t0)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(run, builder, usage), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(request, run, builder, headers)

    def _timeout() -> ApiError:
        return ApiError(504, f"the request did not finish within {cfg.request_timeout_s:g} s (the server's request "
                        "timeout) and was cancelled; ask for fewer tokens or retry later", "timeout_error",
                        code="timeout")

    class _Run:
        """One accepted request: its Deltas, timing and outcome metrics."""

        def __init__(self, gen: Generation, label: str, kind: str, t0: float):
            self.gen, self.label, self.kind, self.t0 = gen, label, kind, t0
            self.first_token = False
            self.tokens = 0
            self.outcome: str | None = None

        async def next(self, deadline: float):
            """The next Delta, None at the end; ApiError 504 past the deadline."""
            try:
                d = await asyncio.wait_for(self.gen.__anext__(), max(0.0, deadline - time.perf_counter()))
            except StopAsyncIteration:
                return None
            except asyncio.TimeoutError:
                raise _timeout() from None
            if d.tokens and not self.first_token:
                self.first_token = True
                metrics.ttft.labels(self.kind).observe(time.perf_counter() - self.t0)
            self.tokens = d.tokens
            if d.done and d.error is None and d.finish_reason == "cancelled":
                d.error = ApiError(503, "the server cancelled this request (shutting down, or its tenant was "
                                   "removed); retry", "server_error", code="cancelled",
                                   headers={"Retry-After": str(cfg.retry_after_s)})
            return d

        def end(self, outcome: str) -> None:
            if self.outcome is not None:
                return
            self.outcome = outcome
            if outcome != "ok":
                self.gen.cancel()  # the row leaves the batch and its KV is freed
            metrics.requests.labels(self.label, self.kind, outcome).inc()
            metrics.completion_tokens.labels(self.label).inc(self.tokens)
            if outcome == "ok":
                metrics.latency.labels(self.kind).observe(time.perf_counter() - self.t0)

    async def _whole(request: Request, run: _Run, builder: ResponseBuilder, headers: dict[str, str]) -> Response:
        async def collect():
            text, lps, last = [], [], None
            deadline = run.t0 + cfg.request_timeout_s
            while (d := await run.next(deadline)) is not None:
                text.append(d.text)
                lps.extend(d.logprobs)
                last = d
            return "".join(text), lps, last

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is stopping this handler
            run.end("cancelled")
            raise
        finally:
            for task in (work, gone):
                task.cancel()
        if not work.done() or work.cancelled():
            run.end("cancelled")  # the client went away: nobody reads the answer
            return Response(status_code=499)
        if work.exception() is not None:
            run.end("timeout" if isinstance(work.exception(), ApiError) and work.exception().status == 504 else "error")
            raise work.exception()
        text, lps, last = work.result()
        if last is None or last.error is not None:
            run.end("error")
            raise from_milora(last.error if last is not None else ServeError("the request ended without an answer"),
                              cfg.retry_after_s)
        run.end("ok")
        return JSONResponse(builder.final(text, lps, last, run.gen.prompt_tokens), headers=headers)

    async def _stream(run: _Run, builder: ResponseBuilder, usage: bool) -> AsyncIterator[str]:
        deadline = run.t0 + cfg.request_timeout_s
        try:
            if builder.kind == "chat":
                yield _sse(builder.chunk(None, first=True))
            last = None
            while True:
                try:
                    d = await run.next(deadline)
                except ApiError as exc:  # timeout
                    run.end("timeout")
                    yield _sse(exc.body())
                    return
                except MiloraError as exc:
                    run.end("error")
                    yield _sse(from_milora(exc, cfg.retry_after_s).body())
                    return
                except Exception as exc:  # noqa: BLE001 - headers are sent: report it in the stream
                    log.error("stream failed", exc_info=exc)
                    run.end("error")
                    yield _sse(ApiError(500, f"internal error ({type(exc).__name__}); the server's log has the "
                                        "details", "server_error", code="internal_error").body())
                    return
                if d is None:
                    break
                if d.error is not None:
                    run.end("error")
                    yield _sse(from_milora(d.error, cfg.retry_after_s).body())
                    return
                if d.text or d.logprobs or d.done:
                    yield _sse(builder.chunk(d))
                last = d
            if usage:
                yield _sse(builder.usage_chunk(run.gen.prompt_tokens, last.tokens if last else 0))
            yield _sse("[DONE]")
            run.end("ok")
        finally:
            run.end("cancelled")  # no-op when already ended; else the client went away mid-stream

    # ---- tenants at run time ----

    def _admin(request: Request) -> None:
        if not cfg.admin_enabled:
            raise ApiError(403, "tenant administration is disabled on this server (it listens beyond loopback "
                           "without --admin-token); restart it with --admin-token TOKEN", "permission_error",
                           code="admin_disabled")
        if cfg.admin_token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.admin_token}".encode()):
                raise ApiError(401, "tenant administration needs the header 'Authorization: Bearer <admin token>' "
                               "(the server's --admin-token)", "authentication_error", code="invalid_admin_token",
                               headers={"WWW-Authenticate": "Bearer"})
        if not be.admin_supported:
            raise ApiError(501, "this deployment does not take tenants at run time over HTTP (on Ray, put the "
                           "adapter in the --adapters-dir every replica reads)", "invalid_request_error",
                           code="admin_unsupported")

    @app.get("/admin/tenants")
    async def admin_list(request: Request):
        _admin(request)
        stats = await run_in_threadpool(be.stats)
        loaded = {t: r for r, s in stats.items() for t in s.get("loaded_tenants", {})}
        return {"tenants": [{"id": t, "loaded": t in loaded} for t in be.model_ids()]}

    @app.post("/admin/tenants", status_code=201)
    async def admin_add(request: Request):
        _admin(request)
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc.msg})", code="invalid_json") from None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("source"), str) \
                or not isinstance(body.get("pin", False), bool) or set(body) - {"name", "source", "pin"}:
            raise ApiError(400, f"expected {{\"name\": str, \"source\": str (an adapter directory or slot pack on the "
                           f"server), \"pin\": bool (optional)}}, got {json.dumps(body)[:120]}")
        if be.has_model(body["name"]):
            raise ApiError(409, f"tenant {body['name']!r} already exists; DELETE /admin/tenants/{body['name']} first "
                           "to replace it", param="name", code="tenant_exists")
        try:
            await be.add_tenant(body["name"], body["source"], body.get("pin", False))
        except MiloraError as exc:
            raise ApiError(400, str(exc), param="source", code="invalid_adapter") from None
        return {"id": body["name"], "object": "model", "created": int(time.time()), "owned_by": "milora"}

    @app.delete("/admin/tenants/{name}")
    async def admin_remove(name: str, request: Request):
        _admin(request)
        if not be.has_model(name):
            raise ApiError(404, f"tenant {name!r} does not exist; GET /v1/models lists them", param="name",
                           code="model_not_found")
        try:
            await be.remove_tenant(name)
        except MiloraError as exc:
            raise ApiError(409, str(exc), param="name", code="tenant_in_use") from None
        return {"id": name, "object": "model", "deleted": True}

    return app
