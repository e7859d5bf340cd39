"""Tiny random models and adapters for tests (built in-process, nothing downloaded)."""

from __future__ import annotations

import torch

from milora.format.config import MiloraConfig
from milora.model.model import MiloraModel


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 96, hidden: int = 32, **overrides):
    """hidden 32: head dim 8 (the portable graphs); hidden 64: head dim 16, which the fused
    flavour needs (onnxruntime's GroupQueryAttention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden // 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, layers: int = 2, vocab: int = 96):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, use_sliding_window=False)
    return Qwen2ForCausalLM(cfg).eval()


def randomize_adapter(model: MiloraModel, seed: int, b_scale: float = 0.5, router_scale: float = 2.0) -> MiloraModel:
    """Non-zero LoRA B and a seed-specific router, so that routing and tenant identity show in
    the outputs (a fresh adapter has B = 0 and changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_parameters_by_name().items():
            if name.endswith("lora_B") or name.endswith("lora_A"):
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
            elif name.endswith("router.weight") or name.endswith("router.pooler"):
                p.copy_(torch.randn(p.shape, generator=g) * router_scale)
    return model


def tenant(seed: int, base_seed: int = 0, builder=tiny_llama, config: MiloraConfig | None = None, **options):
    model = MiloraModel(builder(base_seed), config or MiloraConfig(rank=4, alpha=8, **options))
    return randomize_adapter(model, seed).eval()
