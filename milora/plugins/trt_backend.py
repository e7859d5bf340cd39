"""A milora.runtime Backend on TensorRT engines built by milora-build-engines. Imports neither
torch nor transformers (numpy, TensorRT and Polygraphy's CUDA wrapper only).

    from milora.runtime import Engine
    from milora.plugins.trt_backend import tensorrt_backend
    engine = Engine(OUT_DIR, backend=tensorrt_backend(ENGINE_DIR), max_batch=8)

Shape legend: b new rows, B running rows, T new tokens, P past tokens, L layers, Hkv KV heads,
D head dim, V vocab, S slots.

Device memory, and when it is written:
    banks [S, ...]        allocated once; a slot's slice is uploaded when a tenant is loaded
                          into it or cleared (write_slot / clear_slot), never per step
    tenant_slots, gates   uploaded by bind_rows, once per change of the batch's membership
    KV                    two buffers per layer and key/value (past and present, swapped after
                          every decode step: present = concat(past, new) becomes the next past
                          without a copy, since its layout is that of a longer past)
    input_ids, mask       uploaded per step (B x (P+T) int64); logits downloaded per step
Rows joining or leaving (merge / keep_rows / repeat_rows) go through host memory once per
membership change, as in the onnxruntime backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from milora.errors import ManifestError, RequestError
from milora.format import manifest as mf
from milora.runtime.backend import MaskedKV, check_slots
from milora.format.padding import left_pad, pad_left_to
from milora.plugins import binding as bd
from milora.plugins.profiles import Range


class TrtRunner:
    """One deserialized engine and its execution context."""

    def __init__(self, trt, runtime, path: Path):
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ManifestError(f"TensorRT cannot load {path} (built for another GPU or TensorRT {trt.__version__}?). "
                                "Fix: rebuild it on this machine with milora-build-engines")
        self.context = self.engine.create_execution_context()

    def run(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int], stream: int) -> None:
        for name, shape in shapes.items():
            self.context.set_input_shape(name, shape)
        for name, ptr in addresses.items():
            self.context.set_tensor_address(name, ptr)
        if not self.context.execute_async_v3(stream):
            raise RequestError("TensorRT failed to run the engine (see its log); the inputs were within its profile")


@dataclass
class TrtKV(MaskedKV):
    """KV and mask of rows, in row order: on the host (after prefill and membership changes) or
    on the device (after a decode step)."""

    mask: np.ndarray  # [B, P] int64
    host: list[np.ndarray] | None  # per past input [B, Hkv, P, D]
    device: list[Any] | None = None  # per past input: [current, next] buffers of capacity length
    capacity: int = 0


@dataclass
class TrtRows:
    slots: np.ndarray  # [B] int64
    gates: np.ndarray  # [B, L, 7] float32
    buffers: dict[str, Any] = field(default_factory=dict)  # device copies, by graph input name


class TensorRTBackend:
    """The Backend (milora.runtime.backend) of an export's TensorRT engines."""

    def __init__(self, root: str | Path, manifest: dict[str, Any], engine_dir: str | Path | None = None,
                 pad_token_id: int = 0, runners: dict[str, Any] | None = None, device=None,
                 limits: dict[str, Range] | None = None):
        """runners / device / limits: stand-ins for tests (default: engine_dir's engines on the GPU)."""
        self.root, self.manifest, self.pad_token_id = Path(root), manifest, pad_token_id
        if runners is None:
            from milora.plugins.build import read_engines

            if engine_dir is None:
                raise RequestError("TensorRTBackend needs engine_dir, a directory written by milora-build-engines")
            doc = read_engines(engine_dir, self.root)
            limits = limits or {k: Range.parse(doc["options"][k], k) for k in ("batch", "sequence", "decode_tokens",
                                                                               "past")}
            runners = _load_runners(Path(engine_dir), doc)
        if device is None:
            from milora.plugins.device import CudaDevice

            device = CudaDevice()
        self.runners, self.dev, self.limits = runners, device, limits
        self.slots, self.num_layers = manifest["slots"], manifest["base"]["num_layers"]
        self.dtype = np.dtype(bd.NP_DTYPES[manifest["dtype"]])
        self.past_names = [n for i in range(self.num_layers) for n in (mf.past_key(i), mf.past_value(i))]
        self.present_names = [n for i in range(self.num_layers) for n in (mf.present_key(i), mf.present_value(i))]
        self.banks = {}
        for name, (spec, per_slot) in bd.bank_layout(manifest).items():
            self.banks[name] = (self.dev.alloc(spec.nbytes), per_slot, spec)
            self._zero(name, range(self.slots))
        # Staging buffers at the profile's largest call, for what is neither a bank, nor KV, nor
        # bound once per membership change (decode's tenant_slots and gates come from bind_rows).
        per_rows = (mf.TENANT_SLOTS, mf.GATES, *self.present_names)
        self.staging = {g: {n: self.dev.alloc(b) for n, b in bd.capacities(manifest, g, limits).items()
                            if n not in self.banks and n not in self.past_names
                            and not (g == "decode" and n in per_rows)}
                        for g in ("prefill", "decode")}

    # ---- adapter slots: uploaded once per slot change ----

    def write_slot(self, slot: int, pack: dict[str, np.ndarray]) -> None:
        for name, (buf, per_slot, spec) in self.banks.items():
            arr = np.ascontiguousarray(pack[name], dtype=spec.dtype)
            if arr.shape != spec.shape[1:]:
                raise ManifestError(f"slot pack tensor {name} has shape {list(arr.shape)}, expected "
                                    f"{list(spec.shape[1:])} (manifest banks); export the pack again")
            self.dev.upload(buf, arr, slot * per_slot)

    def clear_slot(self, slot: int) -> None:
        for name in self.banks:
            self._zero(name, [slot])

    def _zero(self, name: str, slots) -> None:
        buf, per_slot, spec = self.banks[name]
        zeros = np.zeros(spec.shape[1:], dtype=spec.dtype)
        for s in slots:
            self.dev.upload(buf, zeros, s * per_slot)

    def check_slots(self, slots) -> np.ndarray:
        """slots as int64 [B], each in 0..S-1, else RequestError before any graph runs: ONNX
        Gather wraps a negative index (slot -1 would read the LAST slot's tenant) and fails
        inside onnxruntime on one past the end."""
        return check_slots(slots, self.slots)

    # ---- graphs ----

    def _run(self, graph: str, p: dict[str, list[bd.TensorSpec]], values: dict[str, Any]) -> None:
        """Upload the per-call inputs, bind everything and run. values: name -> ndarray (uploaded
        to staging) or a device buffer already holding the tensor."""
        addresses, shapes = {}, {}
        for t in p["inputs"]:
            shapes[t.name] = t.shape
            v = values.get(t.name)
            if t.name in self.banks:
                addresses[t.name] = self.banks[t.name][0].ptr
            elif isinstance(v, np.ndarray):
                buf = self.staging[graph][t.name]
                self.dev.upload(buf, np.ascontiguousarray(v, dtype=t.dtype))
                addresses[t.name] = buf.ptr
            else:
                addresses[t.name] = v.ptr
        for t in p["outputs"]:
            v = values.get(t.name)
            addresses[t.name] = (v if v is not None else self.staging[graph][t.name]).ptr
        self.runners[graph].run(shapes, addresses, self.dev.stream)

    def prefill(self, prompts: list[list[int]], slots) -> tuple[np.ndarray, np.ndarray, TrtKV]:
        """Left-padded prefill of new rows -> (last-position logits [b, V], gates [b, L, 7], their KV on the host).
        More rows than the engine's batch maximum run in chunks."""
        slots = self.check_slots(slots)
        if len(slots) != len(prompts) or not all(len(p) for p in prompts):
            raise RequestError(f"prefill needs one slot per prompt and no empty prompt; got {len(prompts)} prompts "
                               f"(lengths {[len(p) for p in prompts][:8]}) and {len(slots)} slots")
        step = self.limits["batch"].max
        parts = [self._prefill(prompts[i:i + step], slots[i:i + step]) for i in range(0, len(prompts), step)]
        logits = np.concatenate([p[0] for p in parts])
        gates = np.concatenate([p[1] for p in parts])
        kv = parts[0][2]
        for p in parts[1:]:
            kv = self.merge(kv, p[2])
        return logits, gates, kv

    def _prefill(self, prompts, slots):
        ids, mask = left_pad(prompts, self.pad_token_id)
        b, t = ids.shape
        bd.check_call("prefill", self.limits, b, t)
        p = bd.plan(self.manifest, "prefill", b, t)
        self._run("prefill", p, {mf.INPUT_IDS: ids, mf.ATTENTION_MASK: mask, mf.TENANT_SLOTS: slots})
        out = {o.name: o for o in p["outputs"]}
        st = self.staging["prefill"]
        logits = self.dev.download(st[mf.LOGITS], out[mf.LOGITS].shape, out[mf.LOGITS].dtype)[:, -1, :]
        gates = self.dev.download(st[mf.GATES], out[mf.GATES].shape, out[mf.GATES].dtype)
        past = [self.dev.download(st[n], out[n].shape, out[n].dtype) for n in self.present_names]
        return logits.astype(np.float32), gates, TrtKV(mask, past)

    def bind_rows(self, slots: np.ndarray, gates: np.ndarray) -> TrtRows:
        """Checked once per membership change and uploaded to the device for every step until the next."""
        slots = self.check_slots(slots)
        gates = np.ascontiguousarray(gates, dtype=np.float32)
        rows = TrtRows(slots, gates)
        if len(slots):
            for name, arr in ((mf.TENANT_SLOTS, slots), (mf.GATES, gates)):
                rows.buffers[name] = self.dev.alloc(arr.nbytes)
                self.dev.upload(rows.buffers[name], arr)
        return rows

    def decode(self, ids: np.ndarray, kv: TrtKV, rows: TrtRows) -> np.ndarray:
        """One token per running row: ids [B] -> logits [B, V]; kv advances by one."""
        return self.extend(np.asarray(ids).reshape(-1, 1), np.ones((len(ids), 1), dtype=np.int64), kv, rows)[:, -1, :]

    def extend(self, ids: np.ndarray, new_mask: np.ndarray, kv: TrtKV, rows: TrtRows) -> np.ndarray:
        """T tokens per row (new_mask [B, T]: 0 marks right padding) -> logits [B, T, V]; kv advances by T."""
        if not isinstance(rows, TrtRows):
            raise RequestError(f"rows must come from bind_rows(slots, gates), got {type(rows).__name__}")
        b, t = ids.shape
        if b != len(rows.slots) or b != kv.mask.shape[0]:
            raise RequestError(f"decode got {b} token rows, {len(rows.slots)} bound rows and {kv.mask.shape[0]} KV rows; "
                               "expected the same running rows in all three")
        bd.check_call("decode", self.limits, b, t, kv.length)
        self._to_device(kv)
        mask = np.concatenate([kv.mask, new_mask.astype(np.int64)], axis=1)  # [B, P+T]
        p = bd.plan(self.manifest, "decode", b, t, kv.length)
        values = {mf.INPUT_IDS: ids.astype(np.int64), mf.ATTENTION_MASK: mask, **rows.buffers}
        for past, present, (cur, nxt) in zip(self.past_names, self.present_names, kv.device):
            values[past], values[present] = cur, nxt
        self._run("decode", p, values)
        kv.device = [[nxt, cur] for cur, nxt in kv.device]  # present becomes the next step's past
        kv.mask = mask
        out = {o.name: o for o in p["outputs"]}
        logits = self.dev.download(self.staging["decode"][mf.LOGITS], out[mf.LOGITS].shape, out[mf.LOGITS].dtype)
        return logits.astype(np.float32, copy=False)

    def _to_device(self, kv: TrtKV) -> None:
        if kv.device is not None:
            return
        cap = self.limits["past"].max + self.limits["decode_tokens"].max
        nbytes = int(np.prod(bd.kv_shape(self.manifest, kv.mask.shape[0], cap))) * self.dtype.itemsize
        kv.device = []
        for arr in kv.host:
            pair = [self.dev.alloc(nbytes), self.dev.alloc(nbytes)]
            self.dev.upload(pair[0], np.ascontiguousarray(arr, dtype=self.dtype))
            kv.device.append(pair)
        kv.host, kv.capacity = None, cap

    def _host(self, kv: TrtKV) -> list[np.ndarray]:
        if kv.host is None:
            shape = bd.kv_shape(self.manifest, kv.mask.shape[0], kv.length)
            kv.host = [self.dev.download(cur, shape, self.dtype) for cur, _ in kv.device]
            for pair in kv.device:
                for buf in pair:
                    buf.free()
            kv.device = None
        return kv.host

    # ---- membership changes (host memory; not per step) ----

    def empty_kv(self) -> TrtKV:
        shape = bd.kv_shape(self.manifest, 0, 0)
        return TrtKV(np.zeros((0, 0), dtype=np.int64), [np.zeros(shape, dtype=self.dtype) for _ in self.past_names])

    def merge(self, a: TrtKV, b: TrtKV) -> TrtKV:
        """Rows of a then rows of b, left-padded to a common length."""
        p = max(a.length, b.length)
        mask = np.concatenate([pad_left_to(a.mask, p), pad_left_to(b.mask, p)], axis=0)
        past = [np.concatenate([pad_left_to(x, p, axis=2), pad_left_to(y, p, axis=2)], axis=0)
                for x, y in zip(self._host(a), self._host(b))]
        return TrtKV(mask, past)

    def keep_rows(self, kv: TrtKV, rows: list[int]) -> TrtKV:
        """Only the given rows, with leading columns no remaining row uses trimmed."""
        mask = kv.mask[rows]
        used = np.nonzero(mask.any(axis=0))[0]
        start = int(used[0]) if used.size else mask.shape[1]
        return TrtKV(mask[:, start:], [x[rows][:, :, start:] for x in self._host(kv)])

    def repeat_rows(self, kv: TrtKV, n: int) -> TrtKV:
        return TrtKV(np.repeat(kv.mask, n, axis=0), [np.repeat(x, n, axis=0) for x in self._host(kv)])

    def close(self) -> None:
        """Free the device memory and the engines now."""
        for buf, _, _ in self.banks.values():
            buf.free()
        for graph in self.staging.values():
            for buf in graph.values():
                buf.free()
        self.banks, self.staging, self.runners = {}, {}, {}


def _load_runners(engine_dir: Path, doc: dict) -> dict[str, TrtRunner]:
    from milora.plugins.trt_plugin import import_tensorrt

    trt, _ = import_tensorrt()
    if doc.get("options", {}).get("plugin") == "jit":
        from milora.plugins.trt_plugin import register

        register()  # a JIT engine calls back into the registered Python plugin
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    return {g: TrtRunner(trt, runtime, engine_dir / doc["graphs"][g]["file"]) for g in ("prefill", "decode")}


def tensorrt_backend(engine_dir: str | Path) -> Callable[[Any], TensorRTBackend]:
    """A factory for Engine(out_dir, backend=...): called with the opened Bundle."""
    def make(bundle) -> TensorRTBackend:
        return TensorRTBackend(bundle.root, bundle.manifest, engine_dir, pad_token_id=bundle.pad_token_id)

    return make


__all__ = ["TensorRTBackend", "TrtKV", "TrtRows", "TrtRunner", "tensorrt_backend"]
