"""The Backend interface: what the Engine needs from an execution backend (onnxruntime on CPU
or CUDA today; TensorRT next). The Engine owns requests, scheduling, tenants and sampling; a
backend owns the graphs, the device memory of the adapter banks and the KV cache.

Shape legend: b new rows, B running rows, T new tokens, L layers, V vocab, S adapter slots.

    backend.write_slot(s, pack) / clear_slot(s)       adapter banks: once per slot change
    logits, gates, kv = backend.prefill(prompts, slots)   routers run: logits [b, V], gates [b, L, 7]
    rows = backend.bind_rows(slots, gates)             when the batch's membership changes
    logits = backend.decode(ids, kv, rows)             [B, V]; kv advances by one token
    logits = backend.extend(ids, new_mask, kv, rows)   [B, T, V]; kv advances by T (scoring)
    kv = backend.merge(kv, new) / keep_rows(kv, rows) / repeat_rows(kv, n)   membership changes
    backend.close()

A KV state is opaque to the Engine except for `tokens` (positions held, for stats). The
interface follows Polygraphy's runners: one object per loaded model, checked inputs,
nothing about scheduling. `Engine(out_dir, backend=...)` takes a Backend, or a factory
called with the opened Bundle; the default is OrtBackend.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from milora.errors import RequestError


@runtime_checkable
class KVState(Protocol):
    @property
    def tokens(self) -> int:
        """KV positions held for the running rows (batch x length, padding included)."""


@runtime_checkable
class Backend(Protocol):
    slots: int  # adapter slots S (slot 0: the base model)
    num_layers: int

    def write_slot(self, slot: int, pack: dict[str, np.ndarray]) -> None:
        """Load one tenant's slot pack (every bank tensor of manifest['banks']) into a slot."""

    def clear_slot(self, slot: int) -> None:
        """Zero a slot (its tenant was evicted or removed)."""

    def check_slots(self, slots: Any) -> np.ndarray:
        """slots as int64 [B] in 0..S-1, else RequestError (before any graph runs)."""

    def prefill(self, prompts: list[list[int]], slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray, KVState]:
        """Run the routers and the prompts: (last-position logits [b, V] float32, gates [b, L, 7]
        float32, the new rows' KV state)."""

    def bind_rows(self, slots: np.ndarray, gates: np.ndarray) -> Any:
        """Per-batch inputs derived from the running rows' slots [B] and gates [B, L, 7]; called
        when the batch's membership changes, never per step (routing is fixed after prefill)."""

    def decode(self, ids: np.ndarray, kv: KVState, rows: Any) -> np.ndarray:
        """One token per running row: ids [B] -> logits [B, V] float32; kv advances by one. The
        logits may be the backend's output buffer (no copy): valid until the next decode or extend."""

    def extend(self, ids: np.ndarray, new_mask: np.ndarray, kv: KVState, rows: Any) -> np.ndarray:
        """T tokens per row (new_mask [B, T]: 0 marks right padding) -> logits [B, T, V]."""

    def empty_kv(self) -> KVState:
        """The KV state of no rows."""

    def merge(self, a: KVState, b: KVState) -> KVState:
        """Rows of a, then rows of b."""

    def keep_rows(self, kv: KVState, rows: list[int]) -> KVState:
        """Only the given rows, in that order."""

    def repeat_rows(self, kv: KVState, n: int) -> KVState:
        """Each row repeated n times (one prompt's cache for n continuations)."""

    def close(self) -> None:
        """Release sessions and device memory now."""


def check_slots(slots: Any, num_slots: int) -> np.ndarray:
    """Tenant slots of a call as int64 [b], or RequestError (before any backend runs) when they
    are not a 1-D integer array or one lies outside 0..num_slots-1. Every backend's
    check_slots is this."""
    arr = np.asarray(slots)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise RequestError(f"tenant slots must be a 1-D array of integers, got {arr.dtype} {list(arr.shape)}")
    bad = arr[(arr < 0) | (arr >= num_slots)]
    if bad.size:
        raise RequestError(f"tenant slot(s) {sorted(set(bad.tolist()))[:5]} out of range; this export has "
                           f"slots 0..{num_slots - 1} (0 = the base model)")
    return arr.astype(np.int64, copy=False)


class MaskedKV:
    """What the engine reads of a KV state whose rows carry a mask [B, P] (1 = a real token):
    the padded length P and the tokens held, B * P. A mixin of the backends' KV dataclasses."""

    mask: np.ndarray

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def tokens(self) -> int:
        return self.mask.size
