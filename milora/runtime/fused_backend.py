"""The Backend of the fused graph flavour on onnxruntime (docs/export.md, "Graph flavours").

Shape legend: B running rows, T new tokens, M KV capacity, L layers, Hkv KV heads, D head dim,
V vocab.

One graph, one session, for both phases (the weights are loaded and prepacked once); its ROUTE
input says which phase a call is. KV lives in one buffer per layer and K/V, [B, Hkv, M, D],
row b's tokens at 0..len[b]-1. A prefill writes the prompts' K/V into fresh buffers (M: the
longest prompt rounded up, with room to decode); GroupQueryAttention then writes each step's
K/V into them in place: past and present are bound to the same memory, so no step copies the
cache (the portable graphs' present = concat(past, new) copies all of it every step). Rows of
any lengths share a batch: the graph gets each row's length (seqlens_k), no mask. The buffers
are copied only when the batch's membership changes or when the longest row reaches M (then M
grows by a quarter).

Per-batch LoRA inputs (format/lora_batch.py) are built and bound in bind_rows, once per
membership change; a decode step runs no router and reads no bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from milora.errors import RequestError
from milora.format import buffers, lora_batch
from milora.format import manifest as mf
from milora.format.padding import right_pad
from milora.runtime.ort_backend import OrtBackend

CAPACITY_STEP = 64  # KV buffers are sized in multiples of this many positions
GROWTH_DIVISOR = 4  # a full buffer grows to what is needed + 1/4 of it


@dataclass
class FusedKV:
    """KV of the rows in row order: per layer k and v [B, Hkv, M, D] (host arrays; on CPU the
    OrtValues bound to the graph share them) and each row's length."""

    lengths: np.ndarray  # [B] int64
    k: list[np.ndarray]
    v: list[np.ndarray]
    values: list[Any] | None = None  # OrtValues over k and v, interleaved per layer (made on first use)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    @property
    def tokens(self) -> int:
        return int(self.lengths.shape[0]) * self.capacity


@dataclass
class StepIO:
    """What a decode step feeds and gets back, for one batch shape [B, T] (CPU): arrays that the
    bound OrtValues share, so a step writes its inputs in place and binds nothing."""

    ids: np.ndarray  # [B, T] int64
    seqlens: np.ndarray  # [B] int32
    total: np.ndarray  # [] int32
    index: np.ndarray  # [B, T] int64: 0..T-1 (logits of every new token)
    logits: np.ndarray  # [B, T, V]: decode's result, rewritten by the next step


@dataclass
class FusedRows:
    """bind_rows' result: the running rows' per-batch LoRA inputs (OrtValues keep them alive)."""

    count: int
    values: dict[str, Any]


def _round_up(n: int) -> int:
    return max(CAPACITY_STEP, -(-n // CAPACITY_STEP) * CAPACITY_STEP)


class FusedOrtBackend(OrtBackend):
    """OrtBackend's sessions, banks and slots; prefill right-padded, decode in place."""

    def __init__(self, root, manifest: dict[str, Any], *args, **kwargs):
        super().__init__(root, manifest, *args, **kwargs)
        base = manifest["base"]
        self.kv_shape = (base["num_kv_heads"], base["head_dim"])
        self._decode_inputs = {i["name"] for i in manifest["graphs"]["decode"]["inputs"]}
        self._tenants = mf.ROUTE in self._decode_inputs  # an export without tenants has no routing inputs
        self._bound_rows: FusedRows | None = None
        self._bound_kv: FusedKV | None = None
        self._io: StepIO | None = None
        self.vocab_size = manifest["base"]["vocab_size"]
        out_type = {o.name: o.type for o in self.sessions["decode"].get_outputs()}[mf.LOGITS]
        self._logits_dtype = np.float16 if out_type == "tensor(float16)" else np.float32
        value = lambda a: self.ort.OrtValue.ortvalue_from_numpy(a, self.device)  # noqa: E731
        prefill, decode = self._bindings["prefill"], self._bindings["decode"]
        if self._tenants:  # fixed per phase: bound once
            prefill.bind_ortvalue_input(mf.ROUTE, value(np.array(True)))
            decode.bind_ortvalue_input(mf.ROUTE, value(np.array(False)))
            self._no_rows = {n: value(a) for n, a in lora_batch.empty(base, manifest["dtype"]).items()
                             if n in self._decode_inputs}  # a prefill builds its LoRA rows in the graph
            for name, v in self._no_rows.items():
                prefill.bind_ortvalue_input(name, v)
        if self.device != "cpu":  # bound first, so logits stay the binding's first output when KV is rebound
            decode.bind_output(mf.LOGITS, self.device)

    # ---- prefill ----

    def prefill(self, prompts: list[list[int]], slots) -> tuple[np.ndarray, np.ndarray, FusedKV]:
        """Right-padded prefill -> (logits [b, V] at each row's last token, gates [b, L, 7], KV)."""
        slots = self.check_slots(slots)
        if len(slots) != len(prompts) or not all(len(p) for p in prompts):
            raise RequestError(f"prefill needs one slot per prompt and no empty prompt; got {len(prompts)} prompts "
                               f"(lengths {[len(p) for p in prompts][:8]}) and {len(slots)} slots")
        lengths = np.array([len(p) for p in prompts], np.int64)
        ids, _ = right_pad(prompts, self.pad_token_id)
        b, t = ids.shape
        cap = _round_up(t + 1)  # room for the first decode steps: no copy before the buffer fills
        kv = FusedKV(lengths, self._alloc(b, cap), self._alloc(b, cap))
        kv.values = [self.ort.OrtValue.ortvalue_from_numpy(a, self.device) for pair in zip(kv.k, kv.v) for a in pair]
        binding = self._bindings["prefill"]
        feeds = {mf.INPUT_IDS: ids, mf.SEQLENS_K: (lengths - 1).astype(np.int32),
                 mf.TOTAL_SEQUENCE_LENGTH: np.array(t, np.int32), mf.LOGITS_INDEX: (lengths - 1)[:, None]}
        if self._tenants:
            feeds[mf.TENANT_SLOTS] = slots
        for name, a in feeds.items():
            binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device))
        binding.clear_binding_outputs()
        binding.bind_output(mf.LOGITS, self.device)
        binding.bind_output(mf.GATES, self.device)
        for past, present, value in zip(self.past_names, self.present_names, kv.values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # written in place
        self.sessions["prefill"].run_with_iobinding(binding)
        out = binding.get_outputs()
        logits = out[0].numpy()[:, -1, :].astype(np.float32)  # [b, V]
        gates = out[1].numpy().copy()  # [b, L, 7]
        binding.clear_binding_outputs()  # the buffers now belong to the decode binding
        if self.device != "cpu":
            self._pull(kv)
        return logits, gates, kv

    # ---- rows ----

    def bind_rows(self, slots: np.ndarray, gates: np.ndarray) -> FusedRows:
        """Build the per-batch LoRA inputs of these rows and bind them to the decode graph."""
        slots = self.check_slots(slots)
        m = self.manifest
        arrays = lora_batch.build(self.banks, slots, gates, m["base"], m["max_rank"], m["dtype"]) \
            if self._tenants else {}
        if self._tenants:
            arrays[mf.TENANT_SLOTS] = slots
        rows = FusedRows(len(slots), {n: self.ort.OrtValue.ortvalue_from_numpy(a, self.device) for n, a in arrays.items()})
        self._bind_lora(rows)
        return rows

    def _bind_lora(self, rows: FusedRows) -> None:
        binding = self._bindings["decode"]
        for name, value in rows.values.items():
            binding.bind_ortvalue_input(name, value)
        self._bound_rows = rows

    # ---- decode ----

    def decode(self, ids: np.ndarray, kv: FusedKV, rows: FusedRows) -> np.ndarray:
        """One token per row: ids [B] -> logits [B, V]; KV written in place, lengths + 1. On CPU
        the logits are the graph's output buffer: valid until the next decode or extend."""
        return self._step(ids.reshape(-1, 1), kv, rows)[:, -1, :]

    def extend(self, ids: np.ndarray, new_mask: np.ndarray, kv: FusedKV, rows: FusedRows) -> np.ndarray:
        """T tokens per row -> logits [B, T, V]. onnxruntime's GroupQueryAttention takes several
        new tokens with a past for one row at a time, so a batch runs them token by token (rows
        past their own end read their padding, which nothing uses)."""
        ids = np.asarray(ids, np.int64)
        if ids.shape[0] == 1 or ids.shape[1] == 1:
            return self._step(ids, kv, rows).copy()
        return np.concatenate([self._step(ids[:, t:t + 1], kv, rows).copy() for t in range(ids.shape[1])],
                              axis=1)  # each step reuses the output buffer

    def _step(self, ids: np.ndarray, kv: FusedKV, rows: FusedRows) -> np.ndarray:
        if not isinstance(rows, FusedRows) or rows.count != ids.shape[0] or len(kv.lengths) != ids.shape[0]:
            raise RequestError(f"rows must come from bind_rows for the same {ids.shape[0]} rows as the KV "
                               f"({len(kv.lengths)}), got {type(rows).__name__}")
        t = ids.shape[1]
        if int(kv.lengths.max()) + t > kv.capacity:
            self._grow(kv, int(kv.lengths.max()) + t)
        if rows is not self._bound_rows:
            self._bind_lora(rows)
        binding = self._bindings["decode"]
        if kv is not self._bound_kv or kv.values is None:
            if kv.values is None:
                kv.values = [self.ort.OrtValue.ortvalue_from_numpy(a, self.device)
                             for pair in zip(kv.k, kv.v) for a in pair]
            for past, present, value in zip(self.past_names, self.present_names, kv.values):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)  # the same memory: updated in place
            self._bound_kv = kv
        ends = kv.lengths + t  # tokens per row after this call
        if self.device == "cpu":
            io = self._step_io(ids.shape)
            io.ids[...] = ids
            io.seqlens[...] = ends - 1
            io.total[...] = ends.max()
            self.sessions["decode"].run_with_iobinding(binding)
            logits = io.logits.astype(np.float32, copy=False)
        else:
            index = np.broadcast_to(np.arange(t, dtype=np.int64), ids.shape)  # logits of every new token
            for name, value in ((mf.INPUT_IDS, ids), (mf.SEQLENS_K, (ends - 1).astype(np.int32)),
                                (mf.TOTAL_SEQUENCE_LENGTH, np.array(ends.max(), np.int32)), (mf.LOGITS_INDEX, index)):
                binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value),
                                                                                          self.device))
            binding.bind_output(mf.LOGITS, self.device)
            self.sessions["decode"].run_with_iobinding(binding)
            logits = binding.get_outputs()[0].numpy().astype(np.float32, copy=False)
            self._pull(kv)  # the host arrays are the truth between membership changes
        kv.lengths = ends
        return logits

    def _step_io(self, shape: tuple[int, int]) -> StepIO:
        """The decode binding's step inputs and logits output for a batch of this shape [B, T],
        bound once (CPU: onnxruntime reads and writes the numpy arrays themselves)."""
        if self._io is not None and self._io.ids.shape == shape:
            return self._io
        b, t = shape
        io = StepIO(np.zeros(shape, np.int64), np.zeros(b, np.int32), np.zeros((), np.int32),
                    np.ascontiguousarray(np.broadcast_to(np.arange(t, dtype=np.int64), shape)),  # every new token
                    buffers.zeros((b, t, self.vocab_size), self._logits_dtype))
        binding = self._bindings["decode"]
        for name, a in ((mf.INPUT_IDS, io.ids), (mf.SEQLENS_K, io.seqlens), (mf.TOTAL_SEQUENCE_LENGTH, io.total),
                        (mf.LOGITS_INDEX, io.index)):
            binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(a, self.device))
        binding.bind_ortvalue_output(mf.LOGITS, self.ort.OrtValue.ortvalue_from_numpy(io.logits, self.device))
        self._io = io
        return io

    # ---- KV (host copies only when membership changes or a buffer fills) ----

    def _alloc(self, rows: int, capacity: int) -> list[np.ndarray]:
        return [buffers.zeros((rows, *self.kv_shape[:1], capacity, self.kv_shape[1]), self.dtype)
                for _ in range(self.num_layers)]

    def _grow(self, kv: FusedKV, needed: int) -> None:
        # Geometric growth (amortized O(1) copying per token) by a quarter, not doubling: a
        # buffer is at most ~25% (plus the rounding) larger than what its rows hold.
        cap = _round_up(needed + needed // GROWTH_DIVISOR)
        for layers in (kv.k, kv.v):
            for i, old in enumerate(layers):
                new = buffers.zeros((*old.shape[:2], cap, old.shape[3]), old.dtype)
                new[:, :, :old.shape[2]] = old
                layers[i] = new
        kv.values = None

    def _pull(self, kv: FusedKV) -> None:
        for i, value in enumerate(kv.values or []):
            (kv.k if i % 2 == 0 else kv.v)[i // 2][...] = value.numpy()

    def empty_kv(self) -> FusedKV:
        return FusedKV(np.zeros(0, np.int64), self._alloc(0, 0), self._alloc(0, 0))

    def _gather(self, parts: list[tuple[FusedKV, list[int]]], capacity: int) -> FusedKV:
        """Rows taken from several KV states, in order, into fresh buffers of this capacity."""
        lengths = np.concatenate([kv.lengths[rows] for kv, rows in parts]) if parts else np.zeros(0, np.int64)
        out = FusedKV(lengths.astype(np.int64), self._alloc(len(lengths), capacity), self._alloc(len(lengths), capacity))
        at = 0
        for kv, rows in parts:
            for r in rows:
                n = int(kv.lengths[r])
                for layer in range(self.num_layers):
                    out.k[layer][at, :, :n] = kv.k[layer][r, :, :n]
                    out.v[layer][at, :, :n] = kv.v[layer][r, :, :n]
                at += 1
        return out

    def merge(self, a: FusedKV, b: FusedKV) -> FusedKV:
        longest = int(max(a.lengths.max(initial=0), b.lengths.max(initial=0)))
        return self._gather([(a, list(range(len(a.lengths)))), (b, list(range(len(b.lengths))))],
                            _round_up(longest + 1))

    def keep_rows(self, kv: FusedKV, rows: list[int]) -> FusedKV:
        longest = int(kv.lengths[rows].max()) if rows else 0
        return self._gather([(kv, list(rows))], _round_up(longest + 1) if rows else 0)

    def repeat_rows(self, kv: FusedKV, n: int) -> FusedKV:
        rows = [r for r in range(len(kv.lengths)) for _ in range(n)]
        return self._gather([(kv, rows)], _round_up(int(kv.lengths.max(initial=0)) + 1))

    def close(self) -> None:
        self._bound_rows = self._bound_kv = self._io = None
        super().close()
