"""The precisions: one function each, ModelProto in (a float32 graph of milora-export with its
weights loaded, nodes named by graph.name_nodes), ModelProto out, graph IO names unchanged.

    fp16          the base weights (weight MatMuls, embedding) stored float16 and cast to
                  float32 where read: float32 compute, half the disk (to_fp16 says why)
    int8-dynamic  weight MatMuls -> int8 weights, activations quantized per call
                  (DynamicQuantizeMatMul / MatMulInteger); embedding Gather int8
    int8-static   Q/DQ pairs on the weight MatMuls' weights (int8, per channel) and inputs (scales
                  from calibration); embedding Gather int8 (onnxruntime). For TensorRT: symmetric
                  int8 activations (zero point 0), no Gather (the form TensorRT's explicit
                  quantization takes)
    fp8           as int8-static for TensorRT with float8 e4m3 (opset >= 19)
    int8-weight   weight-only MatMulNBits with 8 bits (block size, accuracy level); embedding
                  float32 (the routing stays closest to float32: that is what it is for)
    int4          weight-only MatMulNBits (block size, accuracy level); embedding as
                  GatherBlockQuantized (int4, block-wise along d)

Never quantized: the adapter banks (graph inputs: tenants are loaded at run time, and their
MatMuls read no initializer), the routers (a flipped choice changes which experts run; they hold
no base weight), every op other than the weight MatMuls and the
embedding (norms, attention, softmax stay float32 in int8 / int4).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from milora.calibration.graph import Plan
from milora.errors import QuantizeError
from milora.format import manifest as mf


@contextlib.contextmanager
def _scratch(where: Path):
    """A scratch directory for the quantizers' own files (they read and write paths)."""
    path = Path(tempfile.mkdtemp(prefix=".quantize-", dir=where))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizers log every node at INFO and warn about every skipped one."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:  # the Distribution calibrator prints its progress to stdout
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        root.setLevel(level)


def _load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def to_fp16(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """The base weights (weight MatMuls, embedding) stored float16, each read through a Cast to
    float32: the graph computes float32 (onnxruntime folds the Casts when it loads the session).

    Why not a float16 graph: onnxruntime's CPU provider runs few ops in float16 (no ScatterND
    with reduction "add", the fused decode's LoRA update) and its float16 converter, tried
    first, produced NaN logits and gates on SmolLM2's fused prefill (its LoRA If branches),
    while passing on the tiny test models. A float16-compute graph for GPUs is milora-export
    --dtype fp16 (portable flavour)."""
    from onnx import numpy_helper

    g = model.graph
    by_name = {n.name: n for n in g.node}
    names = {by_name[n].input[1] for n in plan.weight_matmuls} | {by_name[n].input[0] for n in plan.embedding}
    casts = []
    for t in list(g.initializer):
        if t.name not in names or t.data_type != onnx.TensorProto.FLOAT:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + "_fp16")
        g.initializer.remove(t)
        g.initializer.append(half)
        casts.append(onnx.helper.make_node("Cast", [half.name], [t.name], name=f"milora_fp16/{t.name}",
                                           to=onnx.TensorProto.FLOAT))
    for i, node in enumerate(casts):
        g.node.insert(i, node)
    return model


def int8_dynamic(model: onnx.ModelProto, plan: Plan, opts: Any, scratch_root: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm"] + (["Gather"] if plan.embedding else [])
    with _scratch(scratch_root) as tmp, _quiet():
        quantize_dynamic(model, tmp / "q.onnx", op_types_to_quantize=ops, per_channel=opts.per_channel,
                         reduce_range=opts.reduce_range, weight_type=QuantType.QInt8,
                         nodes_to_quantize=plan.weight_matmuls + plan.embedding,
                         extra_options={"MatMulConstBOnly": True, "EnableSubgraph": False,
                                        # the fused graphs' contrib ops stop onnx's type inference
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})
        return _load(tmp / "q.onnx")


def nbits(model: onnx.ModelProto, plan: Plan, opts: Any, bits: int) -> onnx.ModelProto:
    """Weight-only block quantization (MatMulNBits, `bits` 4 or 8) of the plan's weight MatMuls
    and embedding (GatherBlockQuantized); activations stay float32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from milora.calibration.graph import all_nodes

    by_name = {n.name: n for n in model.graph.node}
    matmuls = [n for n in plan.weight_matmuls if by_name[n].op_type == "MatMul"]  # MatMulNBits takes MatMul only
    # onnxruntime's nodes_to_include only ADDS to op_types_to_quantize (every MatMul with a
    # constant B would be quantized, the LM head and kept-float MatMuls included): the nodes
    # that must stay float are named in nodes_to_exclude instead.
    targets = set(matmuls + plan.embedding)
    exclude = [n.name for n in all_nodes(model.graph) if n.op_type in ("MatMul", "Gather") and n.name not in targets]
    with _quiet():
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=opts.block_size, is_symmetric=opts.symmetric,
                                 accuracy_level=opts.accuracy_level, nodes_to_include=sorted(targets),
                                 nodes_to_exclude=exclude,
                                 op_types_to_quantize=("MatMul", "Gather") if plan.embedding else ("MatMul",),
                                 quant_axes=(("MatMul", 0), ("Gather", 1)))
        q.process()
    return q.model.model


def qdq_static(model: onnx.ModelProto, plan: Plan, opts: Any, reader, scratch_root: Path,
               tensorrt: bool, fp8: bool = False) -> onnx.ModelProto:
    """Q/DQ on the weight MatMuls (and the embedding for onnxruntime), scales from the reader."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}
    if fp8:
        act = weight = QuantType.QFLOAT8E4M3FN
    else:
        # onnxruntime's CPU kernels prefer uint8 activations; TensorRT takes int8 with zero point 0.
        act, weight = (QuantType.QInt8 if tensorrt else QuantType.QUInt8), QuantType.QInt8
    embed = [] if tensorrt else plan.embedding
    targets = plan.weight_matmuls + embed
    # (No CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator drops the batches it
    # collected when that limit is reached; MinMax keeps only per-batch min / max anyway.)
    extra = {"MatMulConstBOnly": True, "EnableSubgraph": False, "WeightSymmetric": True,
             "DefaultTensorType": onnx.TensorProto.FLOAT,
             "ActivationSymmetric": tensorrt or fp8,
             "DedicatedQDQPair": False,
             # Q/DQ on the MatMul inputs only: quantized outputs would round the logits and the
             # residual stream as well (and are not what TensorRT fuses).
             "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Gather"]}
    if opts.calib_method == "percentile":
        extra["CalibPercentile"] = opts.percentile
    method = methods[opts.calib_method]
    if fp8:  # onnxruntime calibrates float8 scales with its Distribution method only
        method = CalibrationMethod.Distribution
    with _scratch(scratch_root) as tmp, _quiet():
        quantize_static(model, tmp / "q.onnx", reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"] + (["Gather"] if embed else []),
                        per_channel=opts.per_channel, reduce_range=False, activation_type=act, weight_type=weight,
                        nodes_to_quantize=targets, calibrate_method=method,
                        extra_options=extra)
        out = _load(tmp / "q.onnx")
    _unquantize_other_consumers(out, set(targets))
    return out


def _unquantize_other_consumers(model: onnx.ModelProto, targets: set[str]) -> None:
    """onnxruntime hands the dequantized copy of an activation to EVERY consumer of the tensor;
    only the quantized MatMuls should read it. Give the others (the LoRA of the same input, a
    router) the original float tensor back: the banks' and routers' inputs carry no Q/DQ."""
    g = model.graph
    dq_source: dict[str, str] = {}
    producer = {o: n for n in g.node for o in n.output}
    for node in g.node:
        if node.op_type == "DequantizeLinear":
            q = producer.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in {t.name for t in g.initializer}:
                dq_source[node.output[0]] = q.input[0]
    for node in g.node:
        if node.name in targets or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, x in enumerate(node.input):
            if x in dq_source:
                node.input[i] = dq_source[x]
    # Q/DQ pairs nobody reads any more (the embedding output's, whose consumers are not MatMuls).
    outputs = {o.name for o in g.output}
    while True:
        used = {x for n in g.node for x in n.input} | outputs
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.node.remove(n)


def check_io(model: onnx.ModelProto, io: dict[str, Any], graph: str) -> None:
    """The quantized graph's inputs and outputs are the manifest's, name for name and type for
    type (a bug guard: the runtime binds by these)."""
    for side, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        got = [(v.name, v.type.tensor_type.elem_type) for v in values]
        want = [(s["name"], onnx.helper.np_dtype_to_tensor_dtype(np.dtype(mf.NP_DTYPES[s["dtype"]])))
                for s in io[side]]
        if got != want:
            diff = [(g, w) for g, w in zip(got, want) if g != w][:3] or (len(got), len(want))
            raise QuantizeError(f"the quantized {graph} graph's {side} differ from the manifest's contract "
                                f"(first differences (got, expected): {diff}); this is a bug in milora-quantize: "
                                "report it with the command line")
