"""Buffers the runtime binds for onnxruntime to read in place start on a cache line."""

from __future__ import annotations

import numpy as np
import pytest

from milora.format import buffers
from milora.format import manifest as mf


@pytest.mark.parametrize("shape,dtype", [((8, 3, 192, 64), np.float32), ((1, 5), np.float16), ((0, 4, 0), np.float32),
                                         ((), np.int32), (7, np.int64), ((3, 1, 49152), np.float32)])
def test_zeros_are_aligned_zeros(shape, dtype):
    a = buffers.zeros(shape, dtype)
    assert a.shape == (shape if isinstance(shape, tuple) else (shape,)) and a.dtype == dtype
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.size == 0 or a.ctypes.data % buffers.ALIGNMENT == 0  # an empty array has no data to align
    assert not a.any()
    a[...] = 1
    assert a.sum() == a.size


def test_fused_backend_kv_and_lora_inputs_are_aligned(tiny_fused_export):
    from milora.runtime.fused_backend import FusedOrtBackend

    _, out = tiny_fused_export
    m = mf.read_manifest(out)
    backend = FusedOrtBackend(out, m)
    try:
        logits, gates, kv = backend.prefill([[5, 6, 7, 8, 9], [10, 11, 12]], np.array([1, 2]))
        rows = backend.bind_rows(np.array([1, 2]), gates)
        backend.decode(logits.argmax(-1), kv, rows)
        arrays = [*kv.k, *kv.v, *backend.banks.values(), backend._io.logits]
        assert all(a.ctypes.data % buffers.ALIGNMENT == 0 for a in arrays)
        lora = [v.numpy() for n, v in rows.values.items() if n.startswith("lora.")]
        assert lora and all(a.size == 0 or a.ctypes.data % buffers.ALIGNMENT == 0 for a in lora)
    finally:
        backend.close()
