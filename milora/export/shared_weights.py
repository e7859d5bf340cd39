"""One external-data file for the prefill and decode graphs (manifest.WEIGHTS_FILE): each
initializer written once, keyed by dtype and content, and each graph's table of where its
tensors lie (graphs.<g>.external_initializers in the manifest). Used by milora-export and by
milora-quantize (milora/calibration), so it imports onnx but not torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

# Initializers of at least this many bytes go to the shared data file; smaller ones stay in
# the .onnx file (as onnx.save's size_threshold did before the file was shared).
EXTERNAL_MIN_BYTES = 1024
# Offsets: 64-byte aligned for SIMD loads from a memory map; tensors of 1 MiB and more at
# 64 KiB (the largest mmap granularity in use: Windows, 64K-page arm64 kernels) so that a
# runtime can map them directly.
ALIGN_SMALL, ALIGN_LARGE, LARGE_BYTES = 64, 1 << 16, 1 << 20
# Element types listed in a graph's table (the manifest's external_initializers), by the numpy
# name a runtime views them with. Quantized graphs (milora-quantize) also hold packed 4-bit and
# float8 tensors, which numpy cannot view: they stay in the file, unlisted, and onnxruntime
# reads them from the graph's own external-data reference (a runtime that maps the file for
# share_weights hands over the listed ones and lets the session load the rest).
TABLE_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8",
                onnx.TensorProto.UINT8: "uint8"}


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every initializer of graph and of its subgraphs (If branches of the lowerings)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _initializers(g)


class SharedWeights:
    """One external-data file for both graphs. Each initializer is written once, keyed by
    its dtype and content (the tracer names folded weights differently in each graph, e.g.
    onnx::MatMul_123), and every graph's TensorProto points at its (offset, length); the
    table of both graphs goes to the manifest so a runtime can map the file once."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._offsets: dict[tuple[int, bytes], tuple[int, int]] = {}
        self.tables: dict[str, dict[str, dict[str, Any]]] = {}

    def externalize(self, model: onnx.ModelProto, graph: str) -> None:
        table = self.tables.setdefault(graph, {})
        for t in _initializers(model.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise RuntimeError(f"initializer {t.name} still points at external data; load it first")
            if not t.HasField("raw_data"):  # typed fields (float_data, ...): store as raw bytes
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
            data = t.raw_data
            if len(data) < EXTERNAL_MIN_BYTES:
                continue
            key = (t.data_type, hashlib.sha256(data).digest())
            if key not in self._offsets:
                align = ALIGN_LARGE if len(data) >= LARGE_BYTES else ALIGN_SMALL
                offset = -self._file.tell() % align + self._file.tell()
                self._file.seek(offset)
                self._file.write(data)
                self._offsets[key] = (offset, len(data))
            offset, length = self._offsets[key]
            set_external_data(t, self.path.name, offset, length)  # sets data_location EXTERNAL
            t.ClearField("raw_data")
            if t.data_type in TABLE_DTYPES:
                table[t.name] = {"offset": offset, "length": length, "shape": list(t.dims),
                                 "dtype": TABLE_DTYPES[t.data_type]}

    def close(self) -> None:
        self._file.close()

    @property
    def unique_bytes(self) -> int:
        return sum(length for _, length in self._offsets.values())
