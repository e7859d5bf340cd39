"""Adapter format v1 on disk: exact round trip and typed, specific errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import randomize_adapter, tenant, tiny_llama, tiny_qwen2
from milora.format.contract import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from milora.errors import AdapterFormatError, BaseMismatchError
from milora.format.config import MiloraConfig
from milora.model.model import add_milora, load_milora

pytestmark = pytest.mark.core

CONFIGS = {
    "default": dict(),
    "options": dict(top_k=2, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), pooler="last",
                    rational_degrees=(6, 5), rational_init="relu", activation_position="pre_pool",
                    gate_mode="renormalized", noisy_gating=True),
    "plain_lora": dict(routed=False, target_modules=("q_proj", "k_proj", "o_proj")),
}


def perturb_router_extras(model, seed: int) -> None:
    # helpers.randomize_adapter leaves the rational coefficients and noise weights at their
    # init; change them too so the round trip has to carry every tensor.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapter_parameters_by_name().items():
            if name.endswith(("act_num", "act_den", "noise_weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.01)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bitwise_exact(tmp_path, builder, name):
    model = tenant(21, builder=builder, **CONFIGS[name])
    perturb_router_extras(model, 1)
    model.save_adapter(tmp_path)
    loaded = load_milora(builder(), tmp_path).eval()
    assert loaded.config == model.config
    saved, back = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == back.keys()
    for k in saved:
        assert saved[k].dtype == back[k].dtype and torch.equal(saved[k], back[k]), k
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.routing.gates, b.routing.gates)


def test_bf16_model_round_trip(tmp_path):
    # numpy (the format's reader) has no bfloat16: the adapter must still load, exactly.
    model = randomize_adapter(add_milora(tiny_llama().to(torch.bfloat16), MiloraConfig(rank=4, alpha=8)), 22)
    model.save_adapter(tmp_path)
    loaded = load_milora(tiny_llama().to(torch.bfloat16), tmp_path)
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(v, loaded.adapter_state_dict()[k]), k
    with pytest.raises(AdapterFormatError, match="bfloat16"):
        model.save_adapter(tmp_path / "x", dtype=torch.bfloat16)


def test_fp16_files_load_rounded(tmp_path):
    model = tenant(23)
    model.save_adapter(tmp_path, dtype=torch.float16)
    assert load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE))["layers.0.q_proj.lora_A"].dtype == torch.float16
    loaded = load_milora(tiny_llama(), tmp_path)
    ref = model.linears[(0, "q_proj")].lora_A
    assert torch.equal(loaded.linears[(0, "q_proj")].lora_A, ref.half().float())
    # Routers stay float32 in the file.
    assert torch.equal(loaded.routers[0].weight, model.routers[0].weight)


@pytest.fixture
def saved(tmp_path):
    tenant(24).save_adapter(tmp_path)
    return tmp_path


def rewrite_tensors(directory, change) -> None:
    path = directory / ADAPTER_WEIGHTS_FILE
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_base_with_other_hidden_size_is_refused(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(BaseMismatchError) as info:
        load_milora(other, saved)
    assert "hidden_size: adapter 32, model 48" in str(info.value)


def test_base_with_other_layer_count_is_refused(saved):
    with pytest.raises(BaseMismatchError, match="num_layers: adapter 2, model 3"):
        load_milora(tiny_llama(layers=3), saved)


def test_missing_tensor(saved):
    rewrite_tensors(saved, lambda t: t.pop("layers.1.down_proj.lora_B"))
    with pytest.raises(AdapterFormatError, match=r"missing tensor layers\.1\.down_proj\.lora_B \(expected shape \[32, 4\]\)"):
        load_milora(tiny_llama(), saved)


def test_wrong_shape(saved):
    rewrite_tensors(saved, lambda t: t.__setitem__("layers.0.q_proj.lora_A", torch.zeros(5, 32)))
    with pytest.raises(AdapterFormatError, match=r"layers\.0\.q_proj\.lora_A has shape \[5, 32\], expected \[4, 32\]"):
        load_milora(tiny_llama(), saved)


def test_unexpected_tensor(saved):
    rewrite_tensors(saved, lambda t: t.__setitem__("layers.0.router.bias", torch.zeros(7)))
    with pytest.raises(AdapterFormatError, match=r"unexpected tensor layers\.0\.router\.bias"):
        load_milora(tiny_llama(), saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(saved, damage):
    path = saved / ADAPTER_WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07not a safetensors file" * 9,
                      "empty": b""}[damage])
    with pytest.raises(AdapterFormatError, match=r"milora_adapter\.safetensors cannot be read.*corrupt"):
        load_milora(tiny_llama(), saved)


def test_missing_weights_file(saved):
    (saved / ADAPTER_WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterFormatError, match=r"milora_adapter\.safetensors is missing"):
        load_milora(tiny_llama(), saved)


def test_missing_config(saved):
    (saved / ADAPTER_CONFIG_FILE).unlink()
    with pytest.raises(AdapterFormatError, match=r"milora_config\.json is missing"):
        load_milora(tiny_llama(), saved)


def test_corrupt_config_json(saved):
    (saved / ADAPTER_CONFIG_FILE).write_text('{"rank": 4, "alpha": ')
    with pytest.raises(AdapterFormatError, match=r"milora_config\.json is not valid JSON"):
        load_milora(tiny_llama(), saved)


def test_config_with_invalid_value(saved):
    path = saved / ADAPTER_CONFIG_FILE
    data = json.loads(path.read_text())
    data["gate_mode"] = "softmax"
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterFormatError, match=r"gate_mode='softmax'.*paper, renormalized"):
        load_milora(tiny_llama(), saved)


def test_config_without_base_dims(saved):
    path = saved / ADAPTER_CONFIG_FILE
    data = json.loads(path.read_text())
    del data["base"]["hidden_size"]
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterFormatError, match=r"'base' lacks \['hidden_size'\]"):
        load_milora(tiny_llama(), saved)


def test_equal_adapters_are_equal_files(tmp_path):
    # safetensors orders its metadata map at random; save_adapter sorts it.
    from safetensors import safe_open

    model = tenant(25)
    files = []
    for i in range(6):
        model.save_adapter(tmp_path / str(i), dtype=torch.float16 if i % 2 else None)
        files.append((tmp_path / str(i) / ADAPTER_WEIGHTS_FILE).read_bytes())
    assert len(set(files[0::2])) == 1 and len(set(files[1::2])) == 1
    with safe_open(str(tmp_path / "0" / ADAPTER_WEIGHTS_FILE), "pt") as f:
        assert f.metadata() == {"format": "milora", "format_version": "1"}
    loaded = load_milora(tiny_llama(), tmp_path / "1")
    assert torch.equal(loaded.linears[(0, "q_proj")].lora_A, model.linears[(0, "q_proj")].lora_A.half().float())
