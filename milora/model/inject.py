"""Finding the seven linears of each decoder layer in a Hugging Face causal LM.

Supported: the LLaMA module layout (model.model.layers[i].self_attn.{q,k,v,o}_proj and
.mlp.{gate,up,down}_proj, all nn.Linear), which Llama, Mistral and Qwen2 (bias on q/k/v)
share, as does any other model built the same way.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from milora.format.contract import EXPERT_PARENT, EXPERTS
from milora.errors import UnsupportedModelError

KNOWN_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _architecture(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    return archs[0] if archs else type(model).__name__


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported model; UnsupportedModelError otherwise, saying what
    was expected and which architectures are supported."""
    arch = _architecture(model)
    layers = getattr(getattr(model, "model", None), "layers", None)
    problem = None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        problem = "it has no decoder layers at model.model.layers"
    else:
        for i, layer in enumerate(layers):
            for name in EXPERTS:
                parent = getattr(layer, EXPERT_PARENT[name], None)
                linear = getattr(parent, name, None)
                if not isinstance(linear, nn.Linear) and type(linear).__name__ != "MiloraLinear":
                    problem = f"layer {i} has no nn.Linear at {EXPERT_PARENT[name]}.{name}"
                    break
            if problem:
                break
    if problem:
        raise UnsupportedModelError(
            f"cannot add MiLoRA to {arch}: {problem}. Supported: {', '.join(KNOWN_ARCHITECTURES)} and any "
            "causal LM with the same layout (model.model.layers[i].self_attn.{q,k,v,o}_proj and "
            ".mlp.{gate,up,down}_proj as nn.Linear)"
        )
    return layers


def base_info(model: nn.Module) -> dict[str, Any]:
    """The base dimensions recorded in adapters and manifests (adapter_format.BASE_KEYS)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return {
        "architecture": _architecture(model),
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
    }


def expert_linear(layer: nn.Module, name: str) -> nn.Module:
    return getattr(getattr(layer, EXPERT_PARENT[name]), name)


def set_expert_linear(layer: nn.Module, name: str, module: nn.Module) -> None:
    setattr(getattr(layer, EXPERT_PARENT[name]), name, module)
