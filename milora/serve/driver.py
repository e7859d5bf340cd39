"""One Engine driven by one background thread; asyncio code submits requests and awaits tokens.

    driver = EngineDriver(Engine(out_dir)); driver.start()
    stream = await driver.submit(GenerateCall("tenant-a", prompt="...", sampling={"temperature": 0}))
    async for delta in stream: ...          # Delta: new text, token count, logprobs, finish
    stream.cancel()                          # the row leaves the batch, its KV is freed

The driver thread is the only one that submits, steps and cancels: requests arriving while a
step runs wait in an inbox and join the batch before the next step (continuous batching of
every tenant's requests). Each Request's on_update callback (fired by the engine after each
token and at the end) pushes a snapshot to the request's event loop with call_soon_threadsafe,
so a waiting coroutine wakes on new tokens and never polls.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from milora.errors import MiloraError, RequestError
from milora.runtime.engine import Engine, Request
from milora.runtime.sampling import SamplingParams
from milora.serve.errors import EngineFailure

log = logging.getLogger("milora.serve")

TOKENS_PER_SECOND_WINDOW = 10.0  # seconds


@dataclass
class GenerateCall:
    """One generation request, as the HTTP layer hands it to a backend. tenant None is the bare
    base model. Exactly one of prompt, messages, prompt_ids. max_tokens None: the server's
    default, clamped to the room left in the context."""

    tenant: str | None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields other than max_new_tokens


@dataclass
class Delta:
    """What a request produced since the last Delta. logprobs: one dict per new token
    {"token", "id", "logprob", "top": [(token, id, logprob), ...]}."""

    text: str = ""
    tokens: int = 0  # completion tokens so far (total)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None  # eos | stop | length | cancelled | error
    error: Exception | None = None


@dataclass(frozen=True)
class _Snapshot:
    n_tokens: int
    text: str
    done: bool
    finish_reason: str | None
    error: Exception | None


class TokenStream:
    """The asyncio side of one request: iterate for Deltas; cancel() at any time."""

    def __init__(self, driver: "EngineDriver", loop: asyncio.AbstractEventLoop, call: GenerateCall):
        self._driver, self._loop, self.call = driver, loop, call
        self.accepted: asyncio.Future = loop.create_future()
        self.req: Request | None = None
        self.prompt_tokens = 0
        self.replica = "local"
        self.cancelled = False
        self.failure: Exception | None = None  # set by the driver when the engine itself failed
        self._latest: _Snapshot | None = None
        self._seen: _Snapshot | None = None
        self._event = asyncio.Event()
        self._streamed_chars = 0
        self._sent_tokens = 0
        self._finished = False
        self._counted = 0  # tokens already added to the driver's counter (engine thread only)
        stop = call.sampling.get("stop") or ()
        self._hold = max((len(s) for s in ((stop,) if isinstance(stop, str) else stop)), default=1) - 1

    # ---- engine thread ----

    def _on_update(self, r: Request) -> None:
        """Engine callback (under the engine lock): snapshot the request, wake its coroutine."""
        n = len(r.output_ids)
        self._driver._count_tokens(n - self._counted)
        self._counted = n
        error = self.failure if (self.failure is not None and r.done) else r.error
        snap = _Snapshot(n, r.text, r.done, "error" if error is not None else r.finish_reason, error)
        self._loop.call_soon_threadsafe(self._push, snap)

    # ---- event loop ----

    def _push(self, snap: _Snapshot) -> None:
        self._latest = snap
        self._event.set()

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> Delta:
        while True:
            if self._finished:
                raise StopAsyncIteration
            snap = self._latest
            if snap is not None and snap is not self._seen:
                self._seen = snap
                delta = self._delta(snap)
                if snap.done:
                    self._finished = True
                    return delta
                if delta.text or delta.logprobs:
                    return delta
            self._event.clear()
            if self._latest is self._seen:
                await self._event.wait()

    def _delta(self, snap: _Snapshot) -> Delta:
        text = snap.text
        if snap.done:
            end = len(text)
        else:
            # Hold back what could still become a stop string, and a trailing U+FFFD (an
            # incomplete UTF-8 sequence that the next token completes).
            end = max(self._streamed_chars, len(text) - self._hold)
            while end > self._streamed_chars and text[end - 1] == "\ufffd":
                end -= 1
        piece = text[self._streamed_chars:end] if end > self._streamed_chars else ""
        self._streamed_chars = max(self._streamed_chars, end)
        logprobs = []
        if self.req is not None and self.req.params.logprobs is not None:
            logprobs = self._driver._logprob_entries(self.req, self._sent_tokens, snap.n_tokens)
        self._sent_tokens = snap.n_tokens
        return Delta(piece, snap.n_tokens, logprobs, snap.done, snap.finish_reason, snap.error)

    def cancel(self) -> None:
        """Stop the request: it leaves the batch at the next step and its KV is freed. Idempotent."""
        if not self._finished:
            self._driver.cancel(self)


class EngineDriver:
    def __init__(self, engine: Engine, default_max_tokens: int = 256):
        if not isinstance(default_max_tokens, int) or default_max_tokens < 1:
            raise RequestError(f"default_max_tokens={default_max_tokens!r}; expected an integer >= 1")
        self.engine = engine
        self.default_max_tokens = default_max_tokens
        self._cv = threading.Condition()
        self._inbox: list[TokenStream] = []
        self._cancels: list[TokenStream] = []
        self._active: set[TokenStream] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.received = 0  # requests handed to submit() so far
        self.tokens_total = 0
        self.steps_total = 0
        self.step_failures = 0
        self._token_log: deque[tuple[float, int]] = deque()

    # ---- lifecycle ----

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="milora-engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread, cancel every request and release the engine's sessions."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self.engine.close()

    # ---- any thread / event loop ----

    async def submit(self, call: GenerateCall) -> TokenStream:
        """Queue a request; returns once the engine accepted it (raises its typed error if not)."""
        stream = TokenStream(self, asyncio.get_running_loop(), call)
        with self._cv:
            if self._stopping or self._thread is None:
                raise EngineFailure("the engine is not running (the server is starting or shutting down); retry")
            self._inbox.append(stream)
            self.received += 1
            self._cv.notify()
        try:
            stream.prompt_tokens = await stream.accepted
        except asyncio.CancelledError:
            self.cancel(stream)
            raise
        return stream

    def cancel(self, stream: TokenStream) -> None:
        with self._cv:
            stream.cancelled = True
            self._cancels.append(stream)
            self._cv.notify()

    def stats(self) -> dict[str, Any]:
        """Engine stats plus tokens/s over the last TOKENS_PER_SECOND_WINDOW seconds (takes the
        engine lock: waits for a running step; call it off the event loop)."""
        s = self.engine.stats()
        now = time.perf_counter()
        log_ = list(self._token_log)
        recent = [(t, n) for t, n in log_ if now - t <= TOKENS_PER_SECOND_WINDOW]
        tps = 0.0
        if recent:
            before = [n for t, n in log_ if now - t > TOKENS_PER_SECOND_WINDOW]
            base = before[-1] if before else 0
            tps = (recent[-1][1] - base) / TOKENS_PER_SECOND_WINDOW
        s.update(tokens_per_second=tps, tokens_total=self.tokens_total, steps_total=self.steps_total,
                 step_failures=self.step_failures, slots_total=self.engine.tenants.num_slots - 1,
                 max_batch=self.engine.max_batch, inbox=len(self._inbox))
        return s

    # ---- the driver thread ----

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not self._inbox and not self._cancels and engine.idle and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    inbox, self._inbox = self._inbox, []
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            for s in cancels:
                if s.req is not None:
                    engine.cancel(s.req)
            for s in inbox:
                self._submit(s)
            if not engine.idle:
                try:
                    engine.step()
                except Exception as exc:  # noqa: BLE001 - the server outlives one failed step
                    self._step_failed(exc)
                self.steps_total += 1
            self._token_log.append((time.perf_counter(), self.tokens_total))
            while len(self._token_log) > 1 and time.perf_counter() - self._token_log[1][0] > TOKENS_PER_SECOND_WINDOW:
                self._token_log.popleft()
            self._active = {s for s in self._active if not (s.req is not None and s.req.done)}
        for s in inbox:
            self._reject(s, EngineFailure("the server is shutting down; retry on another server"))

    def _submit(self, s: TokenStream) -> None:
        if s.cancelled:  # its client left before the engine saw it
            self._call(s, s.accepted.cancel)
            return
        try:
            ids, params = self._prepare(s.call)
            s.req = self.engine.submit(s.call.tenant, prompt_ids=ids, params=params, on_update=s._on_update)
        except MiloraError as exc:
            self._reject(s, exc)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template that fails on these messages
            log.exception("request preparation failed")
            self._reject(s, RequestError(f"the request could not be prepared: {type(exc).__name__}: {exc}"))
            return
        self._active.add(s)
        self._resolve(s, len(ids))

    def _prepare(self, call: GenerateCall) -> tuple[list[int], SamplingParams]:
        bundle = self.engine.bundle
        if call.prompt_ids is not None:
            ids = list(call.prompt_ids)
        else:
            if call.messages is not None:
                from jinja2 import TemplateError

                try:
                    text = bundle.apply_chat_template(call.messages)
                except TemplateError as exc:
                    raise RequestError(f"the chat template cannot render these messages ({exc}); check each "
                                       "message's role and content") from None
            else:
                text = call.prompt
            ids = bundle.encode(text)
        max_new = call.max_tokens
        if max_new is None:
            room = (self.engine.max_context or (len(ids) + self.default_max_tokens)) - len(ids)
            max_new = max(1, min(self.default_max_tokens, room))
        return ids, SamplingParams(max_new_tokens=max_new, **call.sampling)

    def _resolve(self, s: TokenStream, value: int) -> None:
        def done():
            if not s.accepted.done():
                s.accepted.set_result(value)
        self._call(s, done)

    def _reject(self, s: TokenStream, exc: BaseException) -> None:
        def done():
            if not s.accepted.done():
                s.accepted.set_exception(exc)
        self._call(s, done)

    def _call(self, s: TokenStream, fn) -> None:
        try:
            s._loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the event loop is closed: nobody waits for this request any more
            if s.req is not None:
                self.engine.cancel(s.req)

    def _step_failed(self, exc: Exception) -> None:
        self.step_failures += 1
        log.exception("engine step failed; failing the %d requests it held", len(self._active))
        failure = EngineFailure(f"the engine failed while running this request ({type(exc).__name__}: {exc}); "
                                "the request was stopped, retry it")
        for s in list(self._active):
            s.failure = failure
            if s.req is not None:
                try:
                    self.engine.cancel(s.req)
                except Exception:  # noqa: BLE001 - cancel what can be cancelled
                    log.exception("cancel after a failed step")

    def _count_tokens(self, n: int) -> None:
        self.tokens_total += n

    def _logprob_entries(self, req: Request, start: int, end: int) -> list[dict[str, Any]]:
        tok = self.engine.bundle.tokenizer
        out = []
        for i in range(start, min(end, len(req.logprobs), len(req.output_ids))):
            lp, top = req.logprobs[i]
            tid = req.output_ids[i]
            out.append({"token": tok.decode([tid], skip_special_tokens=False), "id": tid, "logprob": lp,
                        "top": [(tok.decode([j], skip_special_tokens=False), j, v) for j, v in top]})
        return out
