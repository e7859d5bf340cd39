"""Bad-input matrix, "Model and adapter directories" (docs/errors.md): a broken base model,
adapter or checkpoint is refused with a typed error and exit status 2, naming the file, what
was seen and expected and the fix; nothing is written."""

from __future__ import annotations

import json
import shutil

import pytest

from errors_helpers import edit_json, fails, nothing_written, raises
from export_helpers import make_model_dir
from helpers import tenant, tiny_llama
from milora.format.adapter import check_base, read_adapter
from milora.errors import AdapterFormatError
from milora.export import cli as export_cli
from milora.format.config import MiloraConfig
from milora.model.importers import cli as import_cli
from milora.runtime import cli as generate_cli
from test_import_reference import reference_package  # noqa: F401 (fixture: the reference code's classes)

ONE = {"solo": MiloraConfig(rank=2, alpha=4, top_k=2)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("errors_src"), ONE)


@pytest.fixture
def copy(model_dir, tmp_path):
    """A private copy of the model directory to break."""
    shutil.copytree(model_dir, tmp_path / "model")
    return tmp_path / "model"


def export_fails(capsys, tmp_path, argv, *needles):
    fails(capsys, export_cli.main, [*argv[:1], tmp_path / "out", "--no-validate", "--quiet", *argv[1:]], *needles)
    assert nothing_written(tmp_path)


def adapter_config(model_dir):
    return model_dir / "adapters" / "solo" / "milora_config.json"


# ---- base model ----

def test_model_dir_missing(capsys, tmp_path):
    export_fails(capsys, tmp_path, [tmp_path / "nope"], f"MODEL_DIR {tmp_path / 'nope'} does not exist",
                 "expected a Hugging Face model directory", "Fix:")


def test_model_dir_without_config_json(capsys, tmp_path, copy):
    (copy / "config.json").unlink()
    export_fails(capsys, tmp_path, [copy], f"{copy} has no config.json", "expected a Hugging Face model directory",
                 "Fix: save the model there with save_pretrained")


def test_model_dir_without_weights(capsys, tmp_path, copy):
    (copy / "model.safetensors").unlink()
    export_fails(capsys, tmp_path, [copy], f"{copy} has no weights file", "expected model.safetensors",
                 "Fix: save the model with save_pretrained")


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    export_fails(capsys, tmp_path, [tmp_path / "gpt2"], "holds a GPT2LMHeadModel",
                 "supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM", "Fix:")


def test_corrupt_base_safetensors(capsys, tmp_path, copy):
    (copy / "model.safetensors").write_bytes(b"not a safetensors file")
    export_fails(capsys, tmp_path, [copy], "cannot load the model weights", "missing or corrupt", "Fix:")


# ---- adapters ----

def test_corrupt_adapter_safetensors(capsys, tmp_path, copy):
    (copy / "adapters" / "solo" / "milora_adapter.safetensors").write_bytes(b"\x00" * 10)
    export_fails(capsys, tmp_path, [copy], "milora_adapter.safetensors cannot be read as safetensors",
                 "the file is corrupt", "Fix: copy or re-save the adapter")


def test_corrupt_peft_safetensors_on_import(capsys, tmp_path):
    src = tmp_path / "peft"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (src / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # truncated header
    config = tiny_llama(0).config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path / "base")
    fails(capsys, import_cli.main, [src, tmp_path / "out", "--base", tmp_path / "base"],
          "adapter_model.safetensors cannot be read as safetensors", "the file is corrupt",
          "Fix: copy the adapter again")
    assert nothing_written(tmp_path)


def test_adapter_for_another_base(capsys, tmp_path, model_dir):
    other = tenant(5, builder=lambda seed: tiny_llama(seed, layers=3), config=MiloraConfig(rank=2, alpha=2))
    other.save_adapter(tmp_path / "other")
    export_fails(capsys, tmp_path, [model_dir, "--adapter", f"x={tmp_path / 'other'}"], "another base model",
                 "num_layers: adapter 3, model 2", "load it onto the base it was trained on")


def test_more_tenants_than_slots(capsys, tmp_path, model_dir):
    export_fails(capsys, tmp_path, [model_dir, "--adapter", f"second={model_dir / 'adapters' / 'solo'}", "--slots", "2"],
                 "2 tenants (solo, second) do not fit in 2 slots", "at most 1 tenants", "pass --slots 3 or more")


def test_adapter_rank_zero(capsys, tmp_path, copy):
    edit_json(adapter_config(copy), lambda c: c.update(rank=0))
    export_fails(capsys, tmp_path, [copy], "milora_config.json: rank=0", "expected a positive integer",
                 "Fix: set rank >= 1")


def test_adapter_top_k_above_experts(capsys, tmp_path, copy):
    edit_json(adapter_config(copy), lambda c: c.update(top_k=8))
    export_fails(capsys, tmp_path, [copy], "top_k=8 is out of range", "expected an integer in 1..7",
                 "Fix: set top_k between 1 and 7")
    edit_json(adapter_config(copy), lambda c: c.update(top_k=3, experts=["q_proj", "v_proj"]))
    export_fails(capsys, tmp_path, [copy], "top_k=3 is out of range", "1..2 (the number of target modules, "
                                                                      "q_proj, v_proj)")


def test_adapter_config_unknown_key(capsys, tmp_path, copy):
    edit_json(adapter_config(copy), lambda c: c.update(top_p=0.9))
    export_fails(capsys, tmp_path, [copy], "keys this milora does not read: ['top_p']", "expected only",
                 "Fix: remove them")


def test_adapter_activation_keys_not_read(capsys, tmp_path, copy):
    edit_json(adapter_config(copy), lambda c: c.update(activation={"type": "gelu", "degrees": [5, 4]}))
    export_fails(capsys, tmp_path, [copy], "'activation' has keys ['degrees'] that are not read for type 'gelu'",
                 "expected only ['type']", "Fix: remove them")


def test_adapter_base_with_hugging_face_key_names(capsys, tmp_path, copy):
    """num_hidden_layers / num_attention_heads / num_key_value_heads / architectures are the
    Hugging Face names of our keys: accepted; contradicting both names is refused."""
    adapter = copy / "adapters" / "solo"
    rename = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads"}

    def to_hf(c):
        c["base"] = {rename.get(k, k): v for k, v in c["base"].items() if k not in ("architecture", "head_dim")}
        c["base"]["architectures"] = ["LlamaForCausalLM"]

    edit_json(adapter / "milora_config.json", to_hf)
    _, base, _ = read_adapter(adapter)
    from milora.model.inject import base_info

    check_base(base, base_info(tiny_llama(0)), "adapter")  # same dims: accepted
    edit_json(adapter / "milora_config.json", lambda c: c["base"].update(num_layers=3))
    export_fails(capsys, tmp_path, [copy], "holds both num_hidden_layers=2 (the Hugging Face name) and num_layers=3",
                 "expected one value", "Fix: keep only 'num_layers'")


def test_adapter_base_missing_keys(tmp_path, copy):
    adapter = copy / "adapters" / "solo"
    edit_json(adapter / "milora_config.json", lambda c: c["base"].pop("hidden_size"))
    raises(AdapterFormatError, lambda: read_adapter(adapter), "'base' lacks ['hidden_size']",
           "expected ['architecture', 'hidden_size'", "Fix:")


def test_reference_checkpoint_with_per_layer_poolers(capsys, tmp_path, reference_package):
    from import_helpers import llama
    from test_import_reference import LoRAGateWithPooling, make_reference, save_reference

    base = llama(num_key_value_heads=4, num_hidden_layers=3)
    modules, gatings = make_reference(base, pooler="last")
    gatings[1] = LoRAGateWithPooling(base.config.hidden_size, "attn", 1, "rational_gelu")
    src = save_reference(tmp_path / "ckpt", modules, gatings)
    base.save_pretrained(tmp_path / "base")
    fails(capsys, import_cli.main, [src, tmp_path / "out", "--base", tmp_path / "base"],
          "layers differ in pooler type (last in layers 0, 2; attention in layers 1)",
          "expected one pooler type for every layer", "Fix: retrain the checkpoint")
    assert nothing_written(tmp_path)


def test_manifest_not_json(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{ not json")
    fails(capsys, generate_cli.main, [tmp_path / "out", "--list-tenants"], "manifest.json is not valid JSON",
          "the file is corrupt", "export again")
