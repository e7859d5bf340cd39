"""Adding MiLoRA to a Hugging Face model: what is trainable, what is refused, where the LoRA
update lands (before the rotary embedding), and float32 routers in half-precision models."""

from __future__ import annotations

import pytest
import torch

from helpers import randomize_adapter, tenant, tiny_llama, tiny_qwen2
from milora.errors import RoutingError, UnsupportedModelError
from milora.format.config import MiloraConfig
from milora.model.model import add_milora
from milora.model.router import MiloraRouter
from milora.format.tolerances import close

pytestmark = pytest.mark.core

BUILDERS = pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])


def linear_dims(hf_config) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each of the 7 linears, from the HF config (not from milora)."""
    d, heads, kv = hf_config.hidden_size, hf_config.num_attention_heads, hf_config.num_key_value_heads
    hd, inter = d // heads, hf_config.intermediate_size
    return {"q_proj": (d, heads * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (heads * hd, d),
            "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}


CONFIGS = [
    MiloraConfig(rank=4, alpha=8),  # defaults: attention pooler, rational (5, 4)
    MiloraConfig(rank=3, alpha=3, target_modules=("q_proj", "k_proj", "down_proj"), pooler="last",
                 activation="rational", rational_degrees=(6, 5), noisy_gating=True),
    MiloraConfig(rank=2, alpha=2, pooler="mean", activation="gelu"),
    MiloraConfig(rank=5, alpha=5, routed=False, target_modules=("v_proj", "o_proj")),
]


@BUILDERS
@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_only_adapter_parameters_are_trainable(builder, cfg):
    base = builder()
    n_base = sum(p.numel() for p in base.parameters())
    model = add_milora(base, cfg)
    hf = base.config
    dims = linear_dims(hf)
    d, L, E, r = hf.hidden_size, hf.num_hidden_layers, len(cfg.target_modules), cfg.rank
    per_layer = sum(r * (dims[m][0] + dims[m][1]) for m in cfg.target_modules)  # lora_A [r, in], lora_B [out, r]
    if cfg.routed:
        per_layer += E * d  # router weight [E, d]
        per_layer += d if cfg.pooler == "attention" else 0  # w_sa [d]
        if cfg.activation == "rational":
            p, q = cfg.rational_degrees
            per_layer += (p + 1) + q
        per_layer += E * d if cfg.noisy_gating else 0  # W_noise
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == L * per_layer
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == n_base  # every base weight, frozen; none added
    assert all(not p.requires_grad for p in base.parameters() if not any(p is t for t in trainable))
    # The adapter's named parameters are exactly the trainable ones.
    named = model.adapter_parameters_by_name()
    assert {id(p) for p in named.values()} == {id(p) for p in trainable}


def test_unsupported_model_lists_supported_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(UnsupportedModelError) as info:
        add_milora(gpt2, MiloraConfig(rank=2, alpha=2))
    msg = str(info.value)
    assert "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert arch in msg


def test_adding_twice_is_refused():
    base = tiny_llama()
    add_milora(base, MiloraConfig(rank=2, alpha=2))
    with pytest.raises(RoutingError, match="already has MiLoRA"):
        add_milora(base, MiloraConfig(rank=2, alpha=2))


def merged_base(builder, model, routing, row: int = 0):
    """A fresh copy of the base with gate * s * B @ A added to every adapted weight: what the
    routed model must compute if the update is part of the projection (before RoPE)."""
    base = builder()
    layers = base.model.layers
    with torch.no_grad():
        for (l, m), lin in model.linears.items():
            parent = layers[l].self_attn if m in ("q_proj", "k_proj", "v_proj", "o_proj") else layers[l].mlp
            gate = routing.gates[row, l, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"].index(m)]
            scale = model.config.alpha / model.config.rank
            getattr(parent, m).weight += gate * scale * (lin.lora_B @ lin.lora_A)
    return base


@BUILDERS
@pytest.mark.parametrize("options", [dict(top_k=2), dict(routed=False, target_modules=("q_proj", "k_proj"))],
                         ids=["routed", "q_k_only"])
def test_lora_update_equals_merged_weight(builder, options):
    # RoPE rotates q and k by a position-dependent angle: an update added after the rotation
    # would not equal one merged into the q_proj/k_proj weights; an update that is part of
    # the projection (docs/method.md, "Experts") does.
    model = tenant(3, builder=builder, **options)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
        merged = merged_base(builder, model, out.routing)(ids).logits
        plain = builder()(ids).logits
    assert torch.allclose(out.logits, merged, **close("torch", "logits"))
    assert not torch.allclose(out.logits, plain, atol=1e-3)  # the adapter does change the output


@BUILDERS
def test_q_proj_output_carries_the_gated_update(builder):
    model = tenant(4, builder=builder, target_modules=("q_proj", "k_proj"), top_k=1)
    seen = {}
    for l in range(2):
        for m in ("q_proj", "k_proj"):
            lin = model.linears[(l, m)]
            lin.register_forward_hook(lambda mod, args, out, key=(l, m): seen.__setitem__(key, (args[0], out)))
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        routing = model(ids).routing
        s = model.config.alpha / model.config.rank
        for (l, m), (x, y) in seen.items():
            lin = model.linears[(l, m)]
            gate = routing.gates[0, l, 0 if m == "q_proj" else 1]
            expected = lin.base(x) + gate * s * (x @ lin.lora_A.t() @ lin.lora_B.t())
            assert torch.allclose(y, expected, **close("torch", "activations")), (l, m)
    # k = 1 of {q, k}: each layer has one expert on, with a non-zero gate.
    assert ((routing.gates != 0).sum(-1) == 1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_routers_run_in_fp32_in_half_precision_models(dtype):
    calls = []

    def record(mod, args, out):
        calls.append((args[0].dtype, [t.dtype for t in out]))

    for how in ("base_cast_first", "model_cast_after"):
        if how == "base_cast_first":
            model = randomize_adapter(add_milora(tiny_llama().to(dtype), MiloraConfig(rank=4, alpha=8)), 5)
        else:
            model = tenant(5).to(dtype)  # .to(dtype) on the whole MiloraModel must spare the routers
        assert {p.dtype for p in model.routers.parameters()} == {torch.float32}, how
        assert model.linears[(0, "q_proj")].lora_A.dtype == dtype
        for r in model.modules():
            if isinstance(r, MiloraRouter):
                r.register_forward_hook(record)
        calls.clear()
        ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            out = model(ids)
        assert out.logits.dtype == dtype
        assert out.routing.gates.dtype == torch.float32
        assert len(calls) == 2 and all(c == (dtype, [torch.float32] * 3) for c in calls), calls


@BUILDERS
def test_gradient_checkpointing_gives_the_same_gradients(builder):
    # The backward recomputes checkpointed layers outside MiloraModel.forward; they must read
    # the routing of the forward they belong to, and the gradients must not change.
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(3))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tenant(6, builder=builder, top_k=2).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad for n, p in model.adapter_parameters_by_name().items()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        # Experts switched off in every row get no gradient (their update is skipped): same in both.
        assert (plain[name] is None) == (ckpt[name] is None), name
        if plain[name] is not None:
            assert torch.allclose(plain[name], ckpt[name], **close("torch", "weights")), name
    assert sum(g is not None for g in plain.values()) > len(plain) // 2
    assert any(g is not None and g.abs().sum() > 0 for n, g in plain.items() if ".router." in n)
