"""Binding plans of the TensorRT backend: every input and output of a graph call with its shape,
dtype and bytes, and the buffer capacities the engines' profiles require. Plain Python and
numpy; no TensorRT.

Shape legend: B rows, T new tokens, P past tokens, S slots, L layers, Hkv KV heads, D head
dim, V vocab.

    prefill(B, T):      input_ids [B,T], attention_mask [B,T], tenant_slots [B], banks [S,...]
                        -> logits [B,1,V] (or [B,T,V]), present.* [B,Hkv,T,D], gates [B,L,7]
    decode(B, T, P):    input_ids [B,T], attention_mask [B,P+T], past.* [B,Hkv,P,D],
                        tenant_slots [B], gates [B,L,7], LoRA banks [S,...]
                        -> logits [B,T,V], present.* [B,Hkv,P+T,D]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from milora.errors import CapacityError
from milora.format import manifest as mf
from milora.format.manifest import NP_DTYPES
from milora.plugins.profiles import Range, axis_values, resolve




@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def axes(manifest: dict, batch: int, tokens: int, past: int = 0) -> dict[str, int]:
    return {mf.AXIS_BATCH: batch, mf.AXIS_SEQ: tokens, mf.AXIS_PAST: past, mf.AXIS_TOTAL: past + tokens,
            mf.AXIS_SLOTS: manifest["slots"]}


def plan(manifest: dict, graph: str, batch: int, tokens: int, past: int = 0) -> dict[str, list[TensorSpec]]:
    """{"inputs": [...], "outputs": [...]} of one call, in the manifest's order."""
    a = axes(manifest, batch, tokens, past)
    spec = manifest["graphs"][graph]
    return {side: [TensorSpec(t["name"], resolve(t["shape"], a, t["name"]), np.dtype(NP_DTYPES[t["dtype"]])) for t in spec[side]]
            for side in ("inputs", "outputs")}


def capacities(manifest: dict, graph: str, limits: dict[str, Range]) -> dict[str, int]:
    """Bytes of the largest call the engine's profile allows, per tensor name."""
    top = axis_values(graph, limits, manifest["slots"])["max"]
    p = plan(manifest, graph, top[mf.AXIS_BATCH], top[mf.AXIS_SEQ], top.get(mf.AXIS_PAST, 0))
    return {t.name: t.nbytes for side in p.values() for t in side}


def check_call(graph: str, limits: dict[str, Range], batch: int, tokens: int, past: int = 0) -> None:
    """CapacityError when a call is outside the engines' profile (they cannot run it)."""
    key = "sequence" if graph == "prefill" else "decode_tokens"
    checks = [("batch", batch, "rows", "--batch"),
              (key, tokens, "prompt tokens" if graph == "prefill" else "new tokens",
               "--sequence" if graph == "prefill" else "--decode-tokens")]
    if graph == "decode":
        checks.append(("past", past, "cached tokens", "--past"))
    bad = [(f"{v} {what} (the engines take {limits[k]})", flag) for k, v, what, flag in checks
           if not limits[k].min <= v <= limits[k].max]
    if bad:
        raise CapacityError(f"the TensorRT {graph} engine cannot run {', '.join(b for b, _ in bad)}; its optimization "
                            f"profile was fixed when it was built. Fix: rebuild with milora-build-engines and a larger "
                            f"{' / '.join(f for _, f in bad)} maximum"
                            + (", or open the Engine with a max_batch within the profile" if bad[0][1] == "--batch"
                               else ""))


def bank_layout(manifest: dict) -> dict[str, tuple[TensorSpec, int]]:
    """Per bank: (its whole [S, ...] tensor, bytes of one slot); slot s starts at s * bytes."""
    out = {}
    for name, b in manifest["banks"].items():
        t = TensorSpec(name, (manifest["slots"], *b["shape"]), np.dtype(NP_DTYPES[b["dtype"]]))
        out[name] = (t, t.nbytes // manifest["slots"])
    return out


def kv_shape(manifest: dict, batch: int, length: int) -> tuple[int, int, int, int]:
    base = manifest["base"]
    return batch, base["num_kv_heads"], length, base["head_dim"]
