"""Tracing the bank model into the prefill and decode ONNX graphs (torch.onnx, dynamo=False:
~1 s for a tiny model against 15-40 s for dynamo, and our own attention code traces cleanly),
then lowering the routed LoRA nodes and saving both with ONE external data file
(manifest.WEIGHTS_FILE): the graphs share the base weights, so disk and a runtime that maps
the file hold them once.

Example sizes are >= 2 for batch, sequence and past (sizes 0 and 1 specialise under
torch.export, which would fix those axes; the tracer is kept to the same habit).
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

from milora.format import manifest as mf
from milora.export.bank_model import BankModel, DecodeGraph, PrefillGraph
from milora.export.lowering import lower

CONSTANT_FOLDING = True
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_SLOTS = 2, 3, 2, 2
EXAMPLE_CAPACITY, EXAMPLE_LORA = 8, 2  # fused decode: KV buffer length; LoRA rows and rank
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def example_inputs(io: dict, base: dict) -> tuple[torch.Tensor, ...]:
    """One example tensor per graph input, named axes replaced by example sizes."""
    sizes = {mf.AXIS_BATCH: EXAMPLE_BATCH, mf.AXIS_SEQ: EXAMPLE_SEQ, mf.AXIS_PAST: EXAMPLE_PAST,
             mf.AXIS_TOTAL: EXAMPLE_PAST + EXAMPLE_SEQ, mf.AXIS_SLOTS: EXAMPLE_SLOTS, mf.AXIS_CAPACITY: EXAMPLE_CAPACITY}
    out = []
    for spec in io["inputs"]:
        # the fused decode graph's per-layer LoRA axes (lora_<l>_<group>_rows / _rank): EXAMPLE_LORA
        shape = [sizes.get(d, EXAMPLE_LORA if isinstance(d, str) else d) for d in spec["shape"]]
        if spec["name"] == mf.INPUT_IDS:
            t = torch.randint(0, base["vocab_size"], shape)
        elif spec["name"] in (mf.ATTENTION_MASK,):
            t = torch.ones(shape, dtype=torch.int64)
        elif spec["name"] == mf.TENANT_SLOTS:
            t = torch.arange(shape[0]) % EXAMPLE_SLOTS
        elif spec["name"] == mf.SLOT_OPTIONS:
            t = torch.ones(shape, dtype=torch.int64)
        elif spec["name"] == mf.SEQLENS_K:
            t = torch.full(shape, EXAMPLE_PAST + EXAMPLE_SEQ - 1, dtype=torch.int32)
        elif spec["name"] == mf.TOTAL_SEQUENCE_LENGTH:
            t = torch.tensor(EXAMPLE_PAST + EXAMPLE_SEQ, dtype=torch.int32)
        elif spec["name"].endswith(".rows"):  # fused LoRA rows [n, 1]: indices into the batch
            t = (torch.arange(shape[0]) % EXAMPLE_BATCH)[:, None]
        else:
            t = torch.rand(shape, dtype=TORCH_DTYPES[spec["dtype"]])
        out.append(t)
    return tuple(out)


def dynamic_axes(io: dict) -> dict[str, dict[int, str]]:
    return {s["name"]: {i: d for i, d in enumerate(s["shape"]) if isinstance(d, str)}
            for s in io["inputs"] + io["outputs"]}


def declare_fixed_dims(model: onnx.ModelProto, io: dict) -> None:
    """Write the contract's fixed output sizes into the graph's declared outputs: the tracer
    names the size-1 axis of the last-position logits symbolically (h[:, -1:])."""
    specs = {s["name"]: s["shape"] for s in io["outputs"]}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        for dim, want in zip(dims, specs.get(out.name, [])):
            if isinstance(want, int):
                dim.dim_value = want


# Initializers of at least this many bytes go to the shared data file; smaller ones stay in
# the .onnx file (as onnx.save's size_threshold did before the file was shared).
EXTERNAL_MIN_BYTES = 1024
# Offsets: 64-byte aligned for SIMD loads from a memory map; tensors of 1 MiB and more at
# 64 KiB (the largest mmap granularity in use: Windows, 64K-page arm64 kernels) so that a
# runtime can map them directly.
ALIGN_SMALL, ALIGN_LARGE, LARGE_BYTES = 64, 1 << 16, 1 << 20


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
            table[t.name] = {"offset": offset, "length": length, "shape": list(t.dims),
                             "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name}

    def close(self) -> None:
        self._file.close()

    @property
    def unique_bytes(self) -> int:
        return sum(length for _, length in self._offsets.values())


def export_graph(core: BankModel, graph: str, path: Path, io: dict, opset: int, lowering: str,
                 weights: SharedWeights, fused=None) -> None:
    """Trace one graph, lower its RoutedLora nodes, save it with its weights in the shared file.
    fused: a FusedCore for the fused flavour (None: the portable graphs)."""
    if fused is not None:
        from milora.export.fused_model import FusedDecodeGraph, FusedPrefillGraph

        module = FusedPrefillGraph(fused) if graph == "prefill" else \
            FusedDecodeGraph(fused, lora=any(i["name"].startswith("lora.") for i in io["inputs"]))
    else:
        module = PrefillGraph(core, io["logits_positions"]) if graph == "prefill" else DecodeGraph(core)
    # The tracer may spill weights next to its output (models over 2 GB): trace into a
    # scratch directory of its own and remove it whole.
    scratch = path.parent / f".trace-{graph}"
    scratch.mkdir()
    raw = scratch / "model.onnx"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example_inputs(io, core.base), str(raw), dynamo=False, opset_version=opset,
                              custom_opsets={"com.microsoft": 1},
                              input_names=[s["name"] for s in io["inputs"]],
                              output_names=[s["name"] for s in io["outputs"]], dynamic_axes=dynamic_axes(io),
                              do_constant_folding=CONSTANT_FOLDING)
        model = onnx.load(str(raw))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lower(model, lowering, core.base["num_layers"])
    if fused is not None:
        from milora.export.fused_ops import packed_qkv

        packed_qkv(model.graph)
    declare_fixed_dims(model, io)
    weights.externalize(model, graph)
    onnx.save(model, str(path))

