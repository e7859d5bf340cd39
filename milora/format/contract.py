"""Names shared by every part of milora (model, export, runtime).

Defined once here and imported everywhere; this module must stay free of torch so the
runtime can read it on a machine without PyTorch.
"""

from __future__ import annotations

# The seven LoRA modules of a LLaMA-family decoder layer, in expert order. The canonical
# routing tensor (gates [B, L, E]) is indexed by position in this tuple.
EXPERTS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NUM_EXPERTS: int = len(EXPERTS)
EXPERT_INDEX: dict[str, int] = {name: i for i, name in enumerate(EXPERTS)}

# A selected expert's gate is never below GATE_FLOOR (2**-126, the smallest normal float32),
# so "selected" (gate != 0) always means "in the router's top-k". Without the floor a large
# router margin makes softmax round the k-th gate to a denormal or to 0, and whether it
# becomes 0 depends on the kernel (flush-to-zero, exp approximations): PyTorch and
# onnxruntime then disagree on which experts a row uses. No float32 output can resolve the
# difference the floor makes (its update is scaled by 1e-38).
GATE_FLOOR: float = 2.0 ** -126

# Which submodule of a decoder layer holds each expert's base linear.
EXPERT_PARENT: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

# Adapter format v1 (docs/adapter-format.md).
ADAPTER_FORMAT_VERSION: int = 1
ADAPTER_CONFIG_FILE: str = "milora_config.json"
ADAPTER_WEIGHTS_FILE: str = "milora_adapter.safetensors"


def lora_a_name(layer: int, module: str) -> str:
    return f"layers.{layer}.{module}.lora_A"


def lora_b_name(layer: int, module: str) -> str:
    return f"layers.{layer}.{module}.lora_B"


def router_tensor_name(layer: int, part: str) -> str:
    """part: weight | pooler | act_num | act_den | noise_weight."""
    return f"layers.{layer}.router.{part}"
