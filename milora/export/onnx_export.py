"""Tracing the bank model into the prefill and decode ONNX graphs (torch.onnx, dynamo=False:
~1 s for a tiny model against 15-40 s for dynamo, and our own attention code traces cleanly),
then lowering the routed LoRA nodes and saving both with ONE external data file
(manifest.WEIGHTS_FILE): the graphs share the base weights, so disk and a runtime that maps
the file hold them once.

Example sizes are >= 2 for batch, sequence and past (sizes 0 and 1 specialise under
torch.export, which would fix those axes; the tracer is kept to the same habit).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import onnx
import torch

from milora.format import manifest as mf
from milora.export.bank_model import BankModel, DecodeGraph, PrefillGraph
from milora.export.lowering import lower
from milora.export.shared_weights import SharedWeights  # noqa: F401 - re-exported (exporter)

CONSTANT_FOLDING = True
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_SLOTS = 2, 3, 2, 2
EXAMPLE_CAPACITY, EXAMPLE_LORA = 8, 2  # fused decode: KV buffer length; LoRA rows and rank
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
                "bool": torch.bool}


def example_inputs(io: dict, base: dict) -> tuple[torch.Tensor, ...]:
    """One example tensor per graph input, named axes replaced by example sizes."""
    sizes = {mf.AXIS_BATCH: EXAMPLE_BATCH, mf.AXIS_SEQ: EXAMPLE_SEQ, mf.AXIS_PAST: EXAMPLE_PAST,
             mf.AXIS_TOTAL: EXAMPLE_PAST + EXAMPLE_SEQ, mf.AXIS_SLOTS: EXAMPLE_SLOTS, mf.AXIS_CAPACITY: EXAMPLE_CAPACITY,
             mf.AXIS_LOGITS: 1}
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
        elif spec["name"] == mf.ROUTE:
            t = torch.tensor(True)
        elif spec["name"] == mf.LOGITS_INDEX:
            t = torch.zeros(shape, dtype=torch.int64)
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


def export_graph(core: BankModel, graph: str, path: Path, io: dict, opset: int, lowering: str,
                 weights: SharedWeights, fused=None) -> None:
    """Trace one graph, lower its RoutedLora nodes, save it with its weights in the shared file.
    fused: a FusedCore for the fused flavour (None: the portable graphs)."""
    if fused is not None:
        from milora.export.fused_model import FusedGraph

        module = FusedGraph(fused, lora=any(i["name"] == mf.ROUTE for i in io["inputs"]))
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
        from milora.export.branches import drop_aliases, select_to_if
        from milora.export.fused_ops import packed_qkv

        packed_qkv(model.graph)
        drop_aliases(model)
        select_to_if(model)
    declare_fixed_dims(model, io)
    weights.externalize(model, graph)
    onnx.save(model, str(path))

