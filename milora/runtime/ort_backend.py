"""onnxruntime execution of an export's prefill and decode graphs.

Shape legend: B rows in the running batch, T prompt tokens, P cached tokens, L layers,
Hkv KV heads, D head dim, V vocab, S adapter slots.

Banks [S, ...] are numpy arrays bound once through IOBinding; on CPU an OrtValue shares
the numpy buffer, so writing a tenant into a slot needs no rebinding and nothing is copied
per step. KV is the portable concat layout (present = concat(past, new)): each step's
present OrtValues are bound as the next step's past without leaving onnxruntime; numpy only
touches KV when the batch's membership changes (rows join after prefill or leave).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from milora.errors import ManifestError, RequestError
from milora.format import buffers
from milora.format import manifest as mf
from milora.runtime import hugepages
from milora.runtime.backend import MaskedKV, check_slots
from milora.format.padding import left_pad, pad_left_to
from milora.format.manifest import NP_DTYPES
from milora.runtime.weights import map_shared_initializers



@dataclass
class BatchKV(MaskedKV):
    """KV and mask of the rows currently decoding, in row order."""

    mask: np.ndarray  # [B, P] int64 (left padding)
    past: list[Any]  # per past input name, OrtValue or ndarray [B, Hkv, P, D]


@dataclass(frozen=True)
class Rows:
    """The running rows' per-batch inputs (Backend.bind_rows): slots [B] and gates [B, L, 7]."""

    slots: np.ndarray
    gates: np.ndarray


class OrtBackend:
    """The Backend (milora.runtime.backend) of the portable graphs on onnxruntime."""

    def __init__(self, root, manifest: dict[str, Any], providers: Sequence[str] | None = None,
                 threads: int | None = None, pad_token_id: int = 0, share_weights: bool = False,
                 huge_pages: bool = True):
        import onnxruntime as ort

        self.ort = ort
        self.manifest = manifest
        self.pad_token_id = pad_token_id
        providers = list(providers or ["CPUExecutionProvider"])
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise ManifestError(f"execution providers {missing} are not available in this onnxruntime "
                                f"(available: {available}); install onnxruntime-gpu for CUDA")
        graphs = manifest["graphs"]
        # share_weights: both sessions read the base weights from one memory map of the
        # export's shared weights file (milora.runtime.weights; kept here, the sessions use it
        # as long as they live), with onnxruntime's weight prepacking off, since each session
        # would otherwise keep its own packed copy of every MatMul weight (the Python API has
        # no way to share packed weights). Default: each session loads the file itself and
        # packs: faster matmuls, about twice the weight memory (BENCHMARKS.md).
        self.shared_weights = map_shared_initializers(ort, root, manifest) if share_weights else None
        if share_weights and self.shared_weights is None:
            raise ManifestError(f"{root} was exported before the graphs shared one weights file; export it "
                                "again to open it with share_weights=True")
        # CUDA EP: inputs and outputs stay on the device; on CPU everything is host memory.
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        # huge_pages (CPU): what the sessions allocate while loading (their packed weights) is
        # moved into 2 MB pages once they are open (milora.runtime.hugepages; docs/runtime.md).
        huge_pages = huge_pages and self.device == "cpu"
        before = hugepages.snapshot() if huge_pages else None
        self.sessions = {}
        for g in mf.GRAPH_ROLES:
            if mf.graph_of(manifest, g) != g:  # the fused flavour's one graph: loaded (weights packed) once
                self.sessions[g] = self.sessions[mf.graph_of(manifest, g)]
                continue
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            if self.shared_weights is not None:
                opts.add_session_config_entry("session.disable_prepacking", "1")
                for name, value in self.shared_weights.values[g].items():
                    opts.add_initializer(name, value)
            self.sessions[g] = ort.InferenceSession(str(root / graphs[g]["file"]), opts, providers=providers)
        self.huge_pages = hugepages.collapse(since=before) if huge_pages else None
        self.num_layers = manifest["base"]["num_layers"]
        self.dtype = NP_DTYPES[manifest["dtype"]]
        self.slots = manifest["slots"]
        self.banks = {n: buffers.zeros([self.slots, *s["shape"]], NP_DTYPES[s["dtype"]])
                      for n, s in manifest["banks"].items()}
        self._inputs = {g: {i["name"] for i in graphs[g]["inputs"]} for g in self.sessions}
        self.past_names = [n for i in range(self.num_layers) for n in (mf.past_key(i), mf.past_value(i))]
        self.present_names = [n for i in range(self.num_layers) for n in (mf.present_key(i), mf.present_value(i))]
        self._bank_values: dict[str, Any] = {}
        self._bindings = {g: s.io_binding() for g, s in self.sessions.items()}
        self._bind_banks()

    # ---- adapter slots ----

    def write_slot(self, slot: int, pack: dict[str, np.ndarray]) -> None:
        for name, bank in self.banks.items():
            bank[slot] = pack[name]
        self._sync_banks()

    def clear_slot(self, slot: int) -> None:
        for bank in self.banks.values():
            bank[slot] = 0
        self._sync_banks()

    def _bind_banks(self) -> None:
        for name, bank in self.banks.items():
            self._bank_values[name] = self.ort.OrtValue.ortvalue_from_numpy(bank, self.device)
        for g, binding in self._bindings.items():
            for name, value in self._bank_values.items():
                if name in self._inputs[g]:
                    binding.bind_ortvalue_input(name, value)

    def _sync_banks(self) -> None:
        # On CPU the OrtValues share the numpy buffers: nothing to do. On a device, copy the
        # changed banks over once per slot change (never per step).
        if self.device != "cpu":
            for name, value in self._bank_values.items():
                value.update_inplace(self.banks[name])

    # ---- graphs ----

    def _run(self, graph: str, feeds: dict[str, Any], outputs: list[str]) -> list[Any]:
        binding = self._bindings[graph]
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device)
            binding.bind_ortvalue_input(name, value)
        binding.clear_binding_outputs()
        for name in outputs:
            binding.bind_output(name, self.device)
        self.sessions[graph].run_with_iobinding(binding)
        return binding.get_outputs()

    def check_slots(self, slots) -> np.ndarray:
        """slots as int64 [B], each in 0..S-1, else RequestError before any graph runs: ONNX
        Gather wraps a negative index (slot -1 would read the LAST slot's tenant) and fails
        inside onnxruntime on one past the end."""
        return check_slots(slots, self.slots)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> tuple[np.ndarray, np.ndarray, BatchKV]:
        """Left-padded prefill of new rows -> (last-position logits [b, V], gates [b, L, 7], their KV)."""
        slots = self.check_slots(slots)
        if len(slots) != len(prompts) or not all(len(p) for p in prompts):
            raise RequestError(f"prefill needs one slot per prompt and no empty prompt; got {len(prompts)} prompts "
                               f"(lengths {[len(p) for p in prompts][:8]}) and {len(slots)} slots")
        ids, mask = left_pad(prompts, self.pad_token_id)
        feeds = {mf.INPUT_IDS: ids, mf.ATTENTION_MASK: mask, mf.TENANT_SLOTS: slots}
        out = self._run("prefill", feeds, [mf.LOGITS, mf.GATES, *self.present_names])
        logits = out[0].numpy()[:, -1, :].astype(np.float32)  # [b, V]
        gates = out[1].numpy().copy()  # [b, L, 7]
        return logits, gates, BatchKV(mask, [o.numpy() for o in out[2:]])

    def bind_rows(self, slots: np.ndarray, gates: np.ndarray) -> Rows:
        """The decode graph takes slots and gates as inputs: checked once here, fed every step."""
        return Rows(self.check_slots(slots), np.ascontiguousarray(gates, dtype=np.float32))

    def decode(self, ids: np.ndarray, kv: BatchKV, rows: Rows) -> np.ndarray:
        """One decode step for the running batch: ids [B] -> logits [B, V]; kv advances by one."""
        ones = np.ones((ids.shape[0], 1), dtype=np.int64)
        return self.extend(ids.reshape(-1, 1), ones, kv, rows)[:, -1, :]

    def extend(self, ids: np.ndarray, new_mask: np.ndarray, kv: BatchKV, rows: Rows) -> np.ndarray:
        """Run the decode graph (no router) on T new tokens per row: ids [B, T], new_mask [B, T]
        (0 marks right padding) -> logits [B, T, V]; kv advances by T."""
        if not isinstance(rows, Rows):
            raise RequestError(f"rows must come from bind_rows(slots, gates), got {type(rows).__name__}")
        mask = np.concatenate([kv.mask, new_mask.astype(np.int64)], axis=1)  # [B, P+T]
        feeds = {mf.INPUT_IDS: ids.astype(np.int64), mf.ATTENTION_MASK: mask, mf.TENANT_SLOTS: rows.slots,
                 mf.GATES: rows.gates}
        feeds.update(zip(self.past_names, kv.past))
        out = self._run("decode", feeds, [mf.LOGITS, *self.present_names])
        kv.mask, kv.past = mask, out[1:]
        return out[0].numpy().astype(np.float32, copy=False)

    def close(self) -> None:
        """Drop the sessions, bindings and banks (the weights go with the sessions)."""
        self.sessions, self._bindings, self._bank_values, self.banks = {}, {}, {}, {}
        self.shared_weights = None

    def repeat_rows(self, kv: BatchKV, n: int) -> BatchKV:
        """Each row repeated n times (one prompt's cache for n continuations)."""
        return BatchKV(np.repeat(kv.mask, n, axis=0), [np.repeat(self._host(x), n, axis=0) for x in kv.past])

    # ---- membership changes (numpy; not per step) ----

    def empty_kv(self) -> BatchKV:
        base = self.manifest["base"]
        shape = (0, base["num_kv_heads"], 0, base["head_dim"])
        return BatchKV(np.zeros((0, 0), dtype=np.int64), [np.zeros(shape, dtype=self.dtype) for _ in self.past_names])

    @staticmethod
    def _host(value: Any) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy()

    def merge(self, a: BatchKV, b: BatchKV) -> BatchKV:
        """Rows of a then rows of b, left-padded to a common length."""
        p = max(a.length, b.length)
        mask = np.concatenate([pad_left_to(a.mask, p), pad_left_to(b.mask, p)], axis=0)
        past = [np.concatenate([pad_left_to(self._host(x), p, axis=2), pad_left_to(self._host(y), p, axis=2)], axis=0)
                for x, y in zip(a.past, b.past)]
        return BatchKV(mask, past)

    def keep_rows(self, kv: BatchKV, rows: list[int]) -> BatchKV:
        """Only the given rows, with leading columns no remaining row uses trimmed."""
        mask = kv.mask[rows]
        used = np.nonzero(mask.any(axis=0))[0]
        start = int(used[0]) if used.size else mask.shape[1]
        return BatchKV(mask[:, start:], [self._host(x)[rows][:, :, start:] for x in kv.past])


def open_backend(root, manifest: dict[str, Any], providers: Sequence[str] | None = None, threads: int | None = None,
                 pad_token_id: int = 0, share_weights: bool = False, huge_pages: bool = True) -> OrtBackend:
    """The onnxruntime backend for an export's graph flavour (manifest "flavour")."""
    if manifest.get("flavour") == mf.FLAVOUR_FUSED:
        from milora.runtime.fused_backend import FusedOrtBackend

        return FusedOrtBackend(root, manifest, providers, threads, pad_token_id, share_weights=share_weights,
                               huge_pages=huge_pages)
    return OrtBackend(root, manifest, providers, threads, pad_token_id, share_weights=share_weights,
                      huge_pages=huge_pages)
