"""The milora runtime: tenants, requests and continuous batching over an export directory.

    engine = Engine(OUT_DIR)
    req = engine.submit("tenant-a", prompt="...", params=SamplingParams(max_new_tokens=32))
    for text in engine.stream(req): print(text, end="")
    results = engine.generate_batch([("a", "..."), ("b", "...")])

Each step: admit queued requests while KV capacity and adapter slots allow, prefill them
together (routers run here, once per prompt), join them to the running batch, and run one
decode step for every running row (no router: the gates from prefill are fed back). Rows of
different tenants and lengths share a batch; finished or cancelled rows leave at once.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from milora.errors import CapacityError, MiloraError, NumericalError, OverloadError, RequestError, TenantError
from milora.runtime.bundle import Bundle
from milora.runtime.detokenize import IncrementalDetokenizer
from milora.runtime.backend import Backend, KVState
from milora.runtime.ort_backend import open_backend
from milora.runtime.sampling import Sampler, SamplingParams, find_stop, token_logprobs
from milora.runtime.tenants import TenantRegistry



@dataclass
class Request:
    id: int
    tenant: str | None  # None: the bare base model (slot 0)
    prompt_ids: list[int]
    params: SamplingParams
    status: str = "queued"  # queued | running | finished | cancelled | failed
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # eos | stop | length | cancelled | error
    error: Exception | None = None
    gates: np.ndarray | None = None  # [L, 7] routing from prefill, read-only afterwards
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    # with params.logprobs: per generated token, (log p(token), [(id, log p)] top alternatives)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each output token was accepted
    # Called (under the engine lock, by whichever thread runs the step) after each new token
    # and once when the request ends; it must be quick, must not raise and must not call the
    # engine (a server uses it to wake the coroutine that streams this request).
    on_update: Callable[["Request"], None] | None = None
    _sampler: Sampler | None = None
    _detok: IncrementalDetokenizer | None = None
    _end_ids: frozenset[int] = frozenset()  # token ids that end the request (EOS unless ignored, stop ids)
    _seen: np.ndarray | None = None  # [V] bool, prompt and output ids: kept only for a repetition penalty
    _slot: int | None = None
    _streamed: int = 0

    @property
    def done(self) -> bool:
        return self.status in ("finished", "cancelled", "failed")

    @property
    def reservation(self) -> int:
        return len(self.prompt_ids) + self.params.max_new_tokens


def _locked(method):
    """Run an Engine method under the engine's lock: any number of threads may submit, cancel,
    step and stream; one step runs at a time and advances every request."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


DEFAULT_MAX_QUEUE = 4096


def _notify(r: Request) -> None:
    if r.on_update is not None:
        try:
            r.on_update(r)
        except Exception:  # noqa: BLE001 - a client's callback must never stop the batch
            r.on_update = None


class Engine:
    def __init__(self, out_dir: str | Path, providers: Sequence[str] | None = None, max_batch: int = 8,
                 kv_budget_tokens: int | None = None, threads: int | None = None, verify: bool = True,
                 share_weights: bool = False, max_queue: int = DEFAULT_MAX_QUEUE, huge_pages: bool = True,
                 backend: Backend | Callable[[Bundle], Backend] | None = None):
        """backend: a Backend (milora.runtime.backend) or a factory called with the opened Bundle;
        default: onnxruntime for the export's graph flavour (OrtBackend, FusedOrtBackend). share_weights: map the export's one
        weights file and hand it to onnxruntime unpacked (portable exports: once for both graphs,
        about 40% less memory; fused exports already load one copy for their one graph, this
        still saves the packed copy's extra). For small devices: slower decode on CPU, because
        the weights are not prepacked. huge_pages (CPU, Linux): move the weights onnxruntime
        packed while loading into 2 MB pages (faster decode, about 1.4 s more at load for
        SmolLM2-135M; milora.runtime.hugepages).
        max_queue: requests waiting for admission beyond this are refused (OverloadError)."""
        if not isinstance(max_batch, int) or max_batch < 1:
            raise RequestError(f"max_batch={max_batch!r}; expected an integer >= 1")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise RequestError(f"max_queue={max_queue!r}; expected an integer >= 1")
        self._lock = threading.RLock()
        self.max_queue = max_queue
        self.bundle = Bundle.open(out_dir, verify=verify)
        m = self.bundle.manifest
        if backend is None:
            backend = open_backend(self.bundle.root, m, providers, threads, self.bundle.pad_token_id,
                                   share_weights=share_weights, huge_pages=huge_pages)
        elif not isinstance(backend, Backend) and callable(backend):
            backend = backend(self.bundle)
        if not isinstance(backend, Backend):
            raise RequestError(f"backend {type(backend).__name__} does not implement milora.runtime.backend.Backend")
        self.backend: Backend = backend
        self.max_batch = max_batch
        self.max_context = m["base"].get("max_position_embeddings")
        self.kv_budget = kv_budget_tokens or max_batch * (self.max_context or 2048)
        self.vocab_size = m["base"]["vocab_size"]
        self.tenants = TenantRegistry(m["slots"], self._load_slot, self.backend.clear_slot)
        for name, info in m["tenants"].items():
            self.tenants.add(name, ("pack", self.bundle.root / info["pack"]))
        self._ids = itertools.count()
        self._queue: deque[Request] = deque()
        self._rows: list[Request] = []
        self._kv: KVState = self.backend.empty_kv()
        self._kv_reserved = 0
        # Per-row decode inputs derived from (tenant, routing): rebuilt only when the batch's
        # membership changes, never per step (routing is fixed after prefill).
        self._rows_bound = self.backend.bind_rows(np.zeros(0, dtype=np.int64),
                                                  np.zeros((0, self.bundle.num_layers, 7), dtype=np.float32))

    @_locked
    def close(self) -> None:
        """Release the onnxruntime sessions and banks now (they hold the model's weights)."""
        for r in list(self._queue) + list(self._rows):
            self.cancel(r)
        # The registry holds bound methods of the backend: drop both so the sessions go now.
        if self.backend is not None:
            self.backend.close()
        self.backend = self.tenants = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- tenants ----

    @_locked
    def add_tenant(self, name: str, source: str | Path, pin: bool = False) -> None:
        """Register a tenant from a slot pack (.safetensors written by milora-export) or a MiLoRA /
        format-v1 adapter directory (converted here: no re-export). Either is read and checked
        now (shapes, base, finite values: NonFiniteError names the tensors); the pack is built or
        read again when a slot needs it."""
        path = Path(source)
        if not path.exists():
            raise TenantError(f"adapter source {path} does not exist")
        kind = "adapter" if path.is_dir() else "pack"
        if kind == "adapter":
            self._read_checked_adapter(path, name)  # validate now; the pack is built when a slot needs it
        else:
            from milora.format.pack import load_pack

            load_pack(path, self.bundle.manifest, where=f"tenant {name!r}")
        self.tenants.add(name, (kind, path), pin=pin)

    @_locked
    def acquire_slot(self, tenant: str | None) -> int:
        """The slot of a tenant, loaded if needed and held (not evicted) until release_slot;
        None: slot 0, the base model. For callers that run the backend directly (scoring)."""
        return 0 if tenant is None else self.tenants.acquire(tenant)

    @_locked
    def release_slot(self, tenant: str | None) -> None:
        if tenant is not None:
            self.tenants.release(tenant)

    @_locked
    def remove_tenant(self, name: str) -> None:
        self.tenants.remove(name)

    @_locked
    def pin(self, name: str) -> None:
        self.tenants.pin(name)

    @_locked
    def unpin(self, name: str) -> None:
        self.tenants.unpin(name)

    def _read_checked_adapter(self, path: Path, name: str | None = None):
        """(config, tensors) of an adapter directory that fits this export's base and banks."""
        from milora.format.adapter import check_base, read_adapter
        from milora.errors import NonFiniteError

        m = self.bundle.manifest
        try:
            config, base, tensors = read_adapter(path)
        except NonFiniteError as exc:
            raise NonFiniteError(f"tenant {name!r}: {exc}" if name else str(exc), exc.problems) from None
        check_base(base, m["base"], f"adapter {path}")
        if config.rank > m["max_rank"]:
            raise TenantError(f"adapter {path} has rank {config.rank} but this export's banks hold rank "
                              f"{m['max_rank']}; re-export with a larger max rank")
        return config, tensors

    def _adapter_pack(self, path: Path) -> dict[str, np.ndarray]:
        from milora.format.pack import build_pack

        m = self.bundle.manifest
        config, tensors = self._read_checked_adapter(path)
        return build_pack(config, tensors, m["base"], m["max_rank"], m["dtype"])

    def _load_slot(self, slot: int, name: str, source: tuple[str, Path]) -> None:
        from milora.errors import SlotLoadError
        from milora.format.pack import load_pack

        kind, path = source
        try:
            pack = self._adapter_pack(path) if kind == "adapter" else load_pack(path, self.bundle.manifest)
        except MiloraError as exc:
            # A TenantError: only this tenant's requests fail, the others keep being served.
            raise SlotLoadError(f"tenant {name!r} cannot be loaded into slot {slot}: {exc}", cause=exc) from exc
        self.backend.write_slot(slot, pack)

    # ---- requests ----

    @_locked
    def submit(self, tenant: str | None, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
               prompt_ids: list[int] | None = None, params: SamplingParams | None = None,
               on_update: Callable[[Request], None] | None = None) -> Request:
        """Queue a request. Exactly one of prompt (raw text), messages (chat, templated) or
        prompt_ids. Each chat turn is a new prompt: routed and prefilled again. tenant None
        serves the bare base model (slot 0: no adapter, no router)."""
        if tenant is not None and tenant not in self.tenants:
            raise TenantError(f"unknown tenant {tenant!r}; this runtime serves: {', '.join(self.tenants.names())}")
        given = [n for n, x in (("prompt", prompt), ("messages", messages), ("prompt_ids", prompt_ids)) if x is not None]
        if len(given) != 1:
            raise RequestError(f"got {', '.join(given) or 'none'} of prompt, messages and prompt_ids; give exactly one")
        if len(self._queue) >= self.max_queue:
            raise OverloadError(f"{len(self._queue)} requests are waiting (max_queue {self.max_queue}); retry later "
                                "or open the engine with a larger max_queue")
        if messages is not None:
            prompt = self.bundle.apply_chat_template(messages)
        if prompt is not None and not isinstance(prompt, str):
            raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = self._check_ids(prompt_ids) if prompt_ids is not None else self.bundle.encode(prompt)
        if not ids:
            raise RequestError("the prompt is empty after tokenization; give at least one token")
        if params is not None and not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = params or SamplingParams()
        req = Request(next(self._ids), tenant, ids, params, _sampler=Sampler(params), on_update=on_update,
                      _detok=IncrementalDetokenizer(self.bundle.tokenizer),
                      _end_ids=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                                   else frozenset(self.bundle.eos_token_ids)))
        if params.repetition_penalty != 1.0:
            req._seen = np.zeros(self.vocab_size, dtype=bool)
            req._seen[ids] = True
        if self.max_context and req.reservation > self.max_context:
            raise CapacityError(f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds "
                                f"the model's context of {self.max_context}; shorten the prompt or lower max_new_tokens")
        if req.reservation > self.kv_budget:
            raise CapacityError(f"request needs {req.reservation} KV tokens but the runtime's KV budget is "
                                f"{self.kv_budget}; open the engine with a larger kv_budget_tokens")
        self._queue.append(req)
        return req

    def _check_ids(self, prompt_ids) -> list[int]:
        """prompt_ids as a list of ints in [0, vocab_size), else RequestError (never fed to a graph:
        an out-of-range id would fail inside onnxruntime, a negative one would wrap silently)."""
        try:
            ids = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise RequestError(f"prompt_ids must be a list of integer token ids, got {prompt_ids!r:.80}") from None
        if any(isinstance(t, bool) or int(t) != t for t in prompt_ids):
            raise RequestError(f"prompt_ids must be integers, got {list(prompt_ids)!r:.80}")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt_ids holds {len(bad)} id(s) outside the vocabulary, e.g. {bad[:5]}; "
                               f"expected ids in 0..{self.vocab_size - 1} (this export's vocab_size)")
        return ids

    @_locked
    def cancel(self, req: Request) -> None:
        if req.done:
            return
        if req in self._queue:
            self._queue.remove(req)
        elif req in self._rows:
            keep = [i for i, r in enumerate(self._rows) if r is not req]
            self._kv = self.backend.keep_rows(self._kv, keep)
            self._rows = [self._rows[i] for i in keep]
            self._membership_changed()
            self._free(req)
        req.status, req.finish_reason = "cancelled", "cancelled"
        req.finished_at = time.perf_counter()
        _notify(req)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._rows

    @_locked
    def stats(self) -> dict[str, Any]:
        return {"queued": len(self._queue), "running": len(self._rows), "kv_reserved_tokens": self._kv_reserved,
                "kv_batch_tokens": self._kv.tokens, "tenant_refs": self.tenants.in_use(),
                "loaded_tenants": self.tenants.slots()}

    # ---- scheduling ----

    @_locked
    def step(self) -> None:
        """Admit and prefill what fits, then one decode step for every running row."""
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self._rows:
            self._decode()

    def run_until_done(self) -> None:
        while not self.idle:
            self.step()

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        while self._queue and len(self._rows) + len(admitted) < self.max_batch:
            req = self._queue[0]
            if self._kv_reserved + req.reservation > self.kv_budget:
                break  # FIFO: wait for running rows to free KV
            try:
                req._slot = 0 if req.tenant is None else self.tenants.acquire(req.tenant)
            except TenantError as exc:
                if self._rows or admitted:
                    break  # a running request will release a slot
                self._queue.popleft()
                self._fail(req, exc)
                _notify(req)
                continue
            self._queue.popleft()
            self._kv_reserved += req.reservation
            req.status = "running"
            admitted.append(req)
        return admitted

    def _prefill(self, reqs: list[Request]) -> None:
        logits, gates, kv = self.backend.prefill([r.prompt_ids for r in reqs], [r._slot for r in reqs])
        finite = np.isfinite(logits.max(axis=1)) & np.isfinite(gates).all(axis=(1, 2))  # [b]
        for i, r in enumerate(reqs):
            r.gates = gates[i]
            r.first_token_at = time.perf_counter()
            if not finite[i]:
                self._fail_numerics(r, "routing gates and logits of its prompt" if not np.isfinite(gates[i]).all()
                                    else "logits of its prompt")
            else:
                self._accept(r, logits[i])
            _notify(r)
        self._rows.extend(reqs)
        self._kv = self.backend.merge(self._kv, kv)
        self._membership_changed()
        self._drop_finished()

    def _decode(self) -> None:
        ids = np.array([r.output_ids[-1] for r in self._rows], dtype=np.int64)
        logits = self.backend.decode(ids, self._kv, self._rows_bound)
        finite = np.isfinite(logits.max(axis=1))  # [B]: NaN and +inf propagate through max
        for i, r in enumerate(self._rows):
            if finite[i]:
                self._accept(r, logits[i])
            else:
                self._fail_numerics(r, f"logits at generated token {len(r.output_ids) + 1}")
            _notify(r)
        self._drop_finished()

    def _accept(self, r: Request, logits: np.ndarray) -> None:
        """Sample one token for a request and apply its stop rules."""
        p = r.params
        if len(r.output_ids) < p.min_new_tokens and r._end_ids:
            logits = logits.copy()
            logits[list(r._end_ids)] = -np.inf  # too early to end: EOS and stop tokens are off
        tok = r._sampler(logits, r._seen)
        if p.logprobs is not None:
            r.logprobs.append(token_logprobs(logits, tok, p.logprobs))
        if tok in r._end_ids:
            return self._finish(r, "eos" if tok in self.bundle.eos_token_ids else "stop")
        r.output_ids.append(tok)
        r.token_times.append(time.perf_counter())
        if r._seen is not None:
            r._seen[tok] = True
        before = len(r.text)
        r._detok.add(tok)
        r.text = r._detok.text
        if p.stop:
            at = find_stop(r.text, p.stop, before)
            if at is not None:
                r.text = r.text[:at]
                return self._finish(r, "stop")
        if len(r.output_ids) >= p.max_new_tokens:
            self._finish(r, "length")

    def _finish(self, r: Request, reason: str) -> None:
        if reason != "stop":  # text held back for an unfinished character shows, as a full decode would
            r._detok.finish()
            r.text = r._detok.text
        r.status, r.finish_reason, r.finished_at = "finished", reason, time.perf_counter()

    def _drop_finished(self) -> None:
        if not any(r.done for r in self._rows):
            return
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        for r in self._rows:
            if r.done:
                self._free(r)
        self._kv = self.backend.keep_rows(self._kv, keep)
        self._rows = [self._rows[i] for i in keep]
        self._membership_changed()

    def _membership_changed(self) -> None:
        slots = np.array([r._slot for r in self._rows], dtype=np.int64)  # [B]
        gates = (np.stack([r.gates for r in self._rows]).astype(np.float32) if self._rows
                 else np.zeros((0, self.bundle.num_layers, 7), dtype=np.float32))  # [B, L, 7]
        self._rows_bound = self.backend.bind_rows(slots, gates)

    def _free(self, r: Request) -> None:
        if r.tenant is not None:
            self.tenants.release(r.tenant)
        self._kv_reserved -= r.reservation

    def _fail_numerics(self, r: Request, what: str) -> None:
        who = "the base model" if r.tenant is None else f"tenant {r.tenant!r}"
        self._fail(r, NumericalError(
            f"request {r.id} ({who}) failed: the {what} hold NaN or inf, so its adapter (or the base weights) is "
            "corrupt or its input overflowed; other requests are unaffected. Check the adapter "
            "(milora-export --check OUT_DIR) and remove or replace the tenant"))

    def _fail(self, r: Request, exc: Exception) -> None:
        r.status, r.finish_reason, r.error = "failed", "error", exc
        r.finished_at = time.perf_counter()

    # ---- convenience forms ----

    def stream(self, req: Request) -> Iterator[str]:
        """Text deltas of one request as they are generated (drives the whole engine). Text that
        could still turn out to start a stop string is held back until it cannot."""
        hold = max((len(s) for s in req.params.stop), default=1) - 1
        while True:
            if not req.done:
                self.step()
            end = len(req.text) if req.done else max(req._streamed, len(req.text) - hold)
            if end > req._streamed:
                yield req.text[req._streamed:end]
                req._streamed = end
            if req.done:
                if req.status == "failed":
                    raise req.error
                return

    def generate(self, tenant: str, prompt: str | None = None, **kwargs) -> Request:
        req = self.submit(tenant, prompt, **kwargs)
        while not req.done:
            self.step()
        if req.status == "failed":
            raise req.error
        return req

    def generate_batch(self, requests: list[dict[str, Any]]) -> list[Request]:
        """Submit every request (dicts of submit's arguments) and run until all are done."""
        reqs = [self.submit(**r) for r in requests]
        self.run_until_done()
        return reqs
