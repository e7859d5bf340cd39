"""Host buffers that onnxruntime reads in place, aligned to a cache line.

numpy puts a large array where malloc does: on glibc, 16 bytes past a page boundary, so every
64-float row of a KV buffer straddles five cache lines instead of four, and onnxruntime's
kernels (GroupQueryAttention's per-head GEMMs above all) read it unaligned. onnxruntime's own
allocations are 64-byte aligned; buffers the runtime owns and binds (KV, the per-batch LoRA
inputs, the banks) are made the same way. On SmolLM2 at B=8 this took a decode step of
onnxruntime-genai's own graph, run from Python with numpy KV buffers, from 38.6 to 35.9 ms
(docs/runtime.md).
"""

from __future__ import annotations

import numpy as np

ALIGNMENT = 64  # bytes: a cache line, and what onnxruntime's CPU allocator gives


def zeros(shape, dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """np.zeros(shape, dtype) whose data starts at a multiple of `alignment` bytes (an empty
    array has no data to align)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)
