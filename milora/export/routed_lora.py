"""The routed LoRA op as one ONNX node, declared once as data (the spec the TensorRT plugin
implements), and its PyTorch placeholder used while tracing.

Semantics, per row b (scale already folded into lora_B, ranks zero-padded to R):

    A = lora_A[slot[b], layer]                       # [d_in, R]
    B = lora_B[slot[b], layer]                       # [R, d_out]
    y[b] = base_out[b] + gate[b, expert] * (x[b] @ A) @ B

The exporter traces the bank model with this op as a single custom node
(domain milora, type RoutedLora) and then lowers every node (lowering.py): to standard ONNX
for onnxruntime, or keeps it for TensorRT with a model-local function body.
"""

from __future__ import annotations

import torch
from torch import Tensor

DOMAIN = "milora"
OP_TYPE = "RoutedLora"
OP_VERSION = 1
# Node interface, in order. Shapes use the legend of manifest.py.
SPEC = {
    "inputs": [
        ("x", "T_lora", "[B, T, d_in] the linear's input"),
        ("base_out", "T_lora", "[B, T, d_out] the base linear's output"),
        ("lora_A", "T_lora", "[S, L, d_in, R] bank of this module type"),
        ("lora_B", "T_lora", "[S, L, R, d_out] bank, scale folded in"),
        ("tenant_slots", "int64", "[B] slot of each row, 0 = base (never negative)"),
        ("layer_gates", "float32", "[B, 7] this layer's gates; 0 = expert off for the row"),
    ],
    "outputs": [("y", "T_lora", "[B, T, d_out] base_out plus the gated update")],
    "attributes": {
        "layer": ("int", "decoder layer index l"),
        "expert": ("int", "expert index m in contract.EXPERTS"),
        "plugin_namespace": ("string", "TensorRT plugin namespace (target tensorrt only)"),
        "plugin_version": ("string", "TensorRT plugin version, a string (target tensorrt only)"),
    },
}
PLUGIN_NAMESPACE = "milora"
PLUGIN_VERSION = "1"


def routed_lora_reference(x: Tensor, base_out: Tensor, lora_a: Tensor, lora_b: Tensor, slots: Tensor,
                          layer_gates: Tensor, layer: int, expert: int) -> Tensor:
    """The op's maths in PyTorch (the semantics above)."""
    a = lora_a[slots, layer]  # [B, d_in, R]
    b = lora_b[slots, layer]  # [B, R, d_out]
    gate = layer_gates[:, expert].to(x.dtype)[:, None, None]  # [B, 1, 1]
    return base_out + ((x @ a) * gate) @ b


class RoutedLoraOp(torch.autograd.Function):
    """Eager: the reference maths. Traced by torch.onnx (dynamo=False): one milora::RoutedLora node."""

    @staticmethod
    def forward(ctx, x, base_out, lora_a, lora_b, slots, layer_gates, layer: int, expert: int):  # noqa: D102
        if torch.jit.is_tracing():
            # The tracer records symbolic() instead; the value is never read, only its shape
            # (computing the maths here took half the trace time on SmolLM2).
            return base_out.clone()
        return routed_lora_reference(x, base_out, lora_a, lora_b, slots, layer_gates, layer, expert)

    @staticmethod
    def symbolic(g, x, base_out, lora_a, lora_b, slots, layer_gates, layer: int, expert: int):  # noqa: D102
        node = g.op(f"{DOMAIN}::{OP_TYPE}", x, base_out, lora_a, lora_b, slots, layer_gates,
                    layer_i=layer, expert_i=expert)
        return node.setType(base_out.type())
