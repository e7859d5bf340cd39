import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from milora import MiloraConfig, add_milora, load_milora


def base_model():
    # A tiny random Llama so this runs anywhere; use your own, e.g.
    # AutoModelForCausalLM.from_pretrained("path/to/SmolLM2-135M-Instruct").
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


# 1. The method's options (defaults: attention pooler, rational activation, top-1 of 7, paper gates).
config = MiloraConfig(rank=8, alpha=16, top_k=1)

# 2. Add MiLoRA: each layer's q, k, v, o, gate, up, down get a routed LoRA expert and a router.
#    The base weights are frozen; only the adapter trains.
model = add_milora(base_model(), config)
print(sum(p.numel() for p in model.parameters() if p.requires_grad), "trainable parameters")
# ... train (milora-train), then:

# 3. Save the adapter: milora_config.json + milora_adapter.safetensors.
adapter_dir = tempfile.mkdtemp()
model.save_adapter(adapter_dir)

# 4. Load base + adapter (refused with BaseMismatchError if the base's dimensions differ).
tenant = load_milora(base_model(), adapter_dir).eval()

# 5. Routing is computed once per prompt: gates [batch, layers, 7], k non-zeros per layer.
prompt = torch.tensor([[1, 17, 42, 99, 7, 64]])
routing = tenant.compute_routing(prompt)
for layer in range(routing.num_layers):
    print("layer", layer, "experts on:", routing.experts(0, layer))

# 6. Generate: the prompt is routed in prefill; decode steps reuse that routing, no router runs.
tokens, used = tenant.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                               do_sample=False, return_routing=True)
assert torch.allclose(used.gates, routing.gates)
print(tokens[0].tolist())
