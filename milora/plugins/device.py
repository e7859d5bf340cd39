"""Device memory for the TensorRT backend, behind a small interface so the backend's logic runs
on host memory in tests:

    dev.alloc(nbytes) -> Buffer (.ptr: an address TensorRT can bind)
    dev.upload(buf, array, offset=0);  dev.download(buf, shape, dtype, offset=0) -> ndarray
    dev.synchronize();  dev.stream (a CUDA stream handle, 0 on the host);  buf.free()

CudaDevice uses the CUDA runtime through Polygraphy's ctypes wrapper (polygraphy.cuda; no torch,
no cuda-python); HostDevice keeps buffers in numpy arrays (tests, and the stand-in runners).
"""

from __future__ import annotations

import weakref

import numpy as np

from milora.errors import DependencyError


class Buffer:
    def __init__(self, device, ptr: int, nbytes: int, host: np.ndarray | None = None):
        self.device, self.ptr, self.nbytes, self.host = device, ptr, nbytes, host
        self._finalizer = weakref.finalize(self, device.release, ptr)

    def free(self) -> None:
        self._finalizer()


class HostDevice:
    """Buffers in host memory (numpy); addresses are the arrays' own."""

    stream = 0

    def __init__(self):
        self._buffers: dict[int, np.ndarray] = {}

    def alloc(self, nbytes: int) -> Buffer:
        arr = np.zeros(max(int(nbytes), 1), dtype=np.uint8)
        self._buffers[arr.ctypes.data] = arr
        return Buffer(self, arr.ctypes.data, int(nbytes), arr)

    def release(self, ptr: int) -> None:
        self._buffers.pop(ptr, None)

    def upload(self, buf: Buffer, array: np.ndarray, offset: int = 0) -> None:
        data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        _fits(buf, offset, data.size)
        buf.host[offset:offset + data.size] = data

    def download(self, buf: Buffer, shape, dtype, offset: int = 0) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        _fits(buf, offset, n)
        return buf.host[offset:offset + n].view(dtype).reshape(shape).copy()

    def view(self, ptr: int, shape, dtype) -> np.ndarray:
        """The array at a bound address (what a stand-in runner reads and writes)."""
        arr = self._buffers[ptr]
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if n > arr.size:
            raise ValueError(f"a {list(shape)} {np.dtype(dtype)} tensor ({n} bytes) does not fit its {arr.size}-byte "
                             "buffer")
        return arr[:n].view(dtype).reshape(shape)

    def synchronize(self) -> None:
        pass


class CudaDevice:
    """Buffers in GPU memory (cudaMalloc), copies on one stream."""

    def __init__(self):
        try:
            from polygraphy import cuda
        except ImportError as exc:
            raise DependencyError(f"the TensorRT backend needs polygraphy's CUDA wrapper ({exc}); install it with "
                                  "pip install 'milora[tensorrt]' (polygraphy==0.53.6)") from None
        self._cuda = cuda
        self._rt = cuda.wrapper()
        self._stream = cuda.Stream()
        self.stream = self._stream.ptr

    def alloc(self, nbytes: int) -> Buffer:
        ptr = self._rt.malloc(max(int(nbytes), 1))
        return Buffer(self, ptr, int(nbytes))

    def release(self, ptr: int) -> None:
        self._rt.free(ptr)

    def upload(self, buf: Buffer, array: np.ndarray, offset: int = 0) -> None:
        data = np.ascontiguousarray(array)
        _fits(buf, offset, data.nbytes)
        # Synchronous copy from pageable memory: the host array may be freed right after.
        self._rt.memcpy(buf.ptr + offset, data.ctypes.data, data.nbytes, self._cuda.MemcpyKind.HostToDevice)

    def download(self, buf: Buffer, shape, dtype, offset: int = 0) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        _fits(buf, offset, out.nbytes)
        self._stream.synchronize()
        self._rt.memcpy(out.ctypes.data, buf.ptr + offset, out.nbytes, self._cuda.MemcpyKind.DeviceToHost)
        return out

    def synchronize(self) -> None:
        self._stream.synchronize()


def _fits(buf: Buffer, offset: int, n: int) -> None:
    if offset < 0 or offset + n > buf.nbytes:
        raise ValueError(f"a copy of {n} bytes at offset {offset} does not fit a {buf.nbytes}-byte buffer")
