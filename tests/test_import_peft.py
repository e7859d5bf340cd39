"""PEFT LoRA adapters imported as non-routed MiLoRA tenants give PEFT's own outputs."""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch

from milora.errors import BaseMismatchError, AdapterImportError
from milora.model.importers import convert_to_milora, import_peft_adapter, load_peft_adapter
from milora.model.inject import base_info
from milora.model.model import MiloraModel
from milora.format.tolerances import close
from tests.helpers import tiny_llama, tiny_qwen2
from tests.import_helpers import llama

peft = pytest.importorskip("peft")

IDS = torch.tensor([[5, 17, 33, 8, 61, 2, 44], [9, 9, 70, 12, 3, 88, 41]])
MASK = torch.ones_like(IDS)


def make_peft(builder, tmp_path, seed=1, **lora_options):
    """Save a PEFT adapter with random non-zero A and B; return (dir, PEFT logits on IDS)."""
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])
    options.update(lora_options)
    model = peft.get_peft_model(builder(), peft.LoraConfig(**options)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path / "peft"
    model.save_pretrained(out)
    with torch.no_grad():
        logits = model(input_ids=IDS, attention_mask=MASK).logits
    return out, logits


def our_logits(model):
    with torch.no_grad():
        return model(IDS, MASK).logits


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2])
def test_plain_lora_matches_peft(builder, tmp_path):
    src, expected = make_peft(builder, tmp_path)
    base_logits = our_logits(MiloraModel(builder(), load_peft_adapter(builder(), src).config))
    model = load_peft_adapter(builder(), src)
    assert not model.config.routed
    assert (model.config.rank, model.config.alpha) == (4, 8.0)  # uniform: kept as trained, not folded
    assert not model.config.notes["scales_folded_into_B"]
    torch.testing.assert_close(our_logits(model), expected, **close("torch", "logits"))
    # The adapter really changes the output (a fresh MiLoRA adapter with B = 0 would not).
    assert (our_logits(model) - base_logits).abs().max() > 1e-2
    gates = model(IDS, MASK).routing.gates
    assert torch.equal(gates, torch.ones_like(gates))


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2])
def test_rslora_on_some_modules_and_layers(builder, tmp_path):
    src, expected = make_peft(builder, tmp_path, r=8, lora_alpha=4, use_rslora=True,
                              target_modules=["q_proj", "self_attn.v_proj", "down_proj"], layers_to_transform=[1])
    config, tensors = import_peft_adapter(builder(), src)
    assert config.target_modules == ("q_proj", "v_proj", "down_proj")
    assert math.isclose(config.scale, 4 / math.sqrt(8), rel_tol=1e-12)  # rsLoRA: alpha / sqrt(r)
    # Layer 0 was not targeted: its tensors are zero, so it gets no update.
    assert not tensors["layers.0.q_proj.lora_B"].any() and tensors["layers.1.q_proj.lora_B"].any()
    model = load_peft_adapter(builder(), src)
    torch.testing.assert_close(our_logits(model), expected, **close("torch", "logits"))
    gates = model(IDS, MASK).routing.gates[0, 0]
    assert gates.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]  # fixed gates of 1 on its modules only


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2])
def test_rank_and_alpha_patterns_fold_exactly(builder, tmp_path):
    src, expected = make_peft(builder, tmp_path, r=4, lora_alpha=8,
                              rank_pattern={"v_proj": 6, "layers.1.mlp.down_proj": 2},
                              alpha_pattern={"q_proj": 3, "model.layers.0.mlp.up_proj": 20})
    config, tensors = import_peft_adapter(builder(), src)
    assert (config.rank, config.alpha, config.scale) == (6, 6.0, 1.0)  # scales folded into B
    assert config.notes["scales_folded_into_B"]
    # down_proj of layer 1 has rank 2: its columns 2.. are zero padding.
    assert tensors["layers.1.down_proj.lora_B"][:, :2].any() and not tensors["layers.1.down_proj.lora_B"][:, 2:].any()
    model = load_peft_adapter(builder(), src)
    torch.testing.assert_close(our_logits(model), expected, **close("torch", "logits"))


def test_converted_directory_round_trips(tmp_path):
    src, expected = make_peft(tiny_qwen2, tmp_path, rank_pattern={"k_proj": 2})
    base = tiny_qwen2()
    out = convert_to_milora(src, tmp_path / "milora", base)
    # Converting only reads the base: it is still a plain HF model afterwards.
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    model = MiloraModel.from_pretrained(base, out)
    torch.testing.assert_close(our_logits(model), expected, **close("torch", "logits"))
    with pytest.raises(AdapterImportError, match="not an empty directory"):
        convert_to_milora(src, out, tiny_qwen2())


def test_base_dims_dict_is_enough(tmp_path):
    src, _ = make_peft(tiny_llama, tmp_path)
    from_model = import_peft_adapter(tiny_llama(), src)
    from_dims = import_peft_adapter(base_info(tiny_llama()), src)
    assert from_model.config == from_dims.config
    assert all(torch.equal(from_model.tensors[k], from_dims.tensors[k]) for k in from_model.tensors)


# ---- refusals: each names the problem ----

def edit_config(src, **changes):
    path = src / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_dora_is_refused(tmp_path):
    src, _ = make_peft(tiny_llama, tmp_path, use_dora=True)
    with pytest.raises(AdapterImportError, match="use_dora.*DoRA"):
        import_peft_adapter(tiny_llama(), src)


@pytest.mark.parametrize("extra", ["lm_head", "embed_tokens"])
def test_targets_outside_the_seven_are_refused(extra, tmp_path):
    src, _ = make_peft(tiny_llama, tmp_path, target_modules=["q_proj", extra])
    with pytest.raises(AdapterImportError, match=f"outside the 7.*{extra}"):
        import_peft_adapter(tiny_llama(), src)


def test_foreign_tensors_are_refused_even_when_the_config_hides_them(tmp_path):
    # A regex target list cannot be checked by name; the tensors in the file still can.
    src, _ = make_peft(tiny_llama, tmp_path, target_modules=r".*(q_proj|lm_head)")
    with pytest.raises(AdapterImportError, match="lm_head.lora_A"):
        import_peft_adapter(tiny_llama(), src)


def test_bias_training_is_refused(tmp_path):
    src, _ = make_peft(tiny_qwen2, tmp_path, bias="lora_only")
    with pytest.raises(AdapterImportError, match="bias"):
        import_peft_adapter(tiny_qwen2(), src)


def test_modules_to_save_is_refused(tmp_path):
    src, _ = make_peft(tiny_llama, tmp_path, modules_to_save=["lm_head"])
    with pytest.raises(AdapterImportError, match="modules_to_save"):
        import_peft_adapter(tiny_llama(), src)


def test_non_lora_peft_types_are_refused(tmp_path):
    model = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                             feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterImportError, match="only LoRA.*IA3"):
        import_peft_adapter(tiny_llama(), tmp_path / "ia3")


def test_base_rewriting_initialisations_are_refused(tmp_path):
    src, _ = make_peft(tiny_llama, tmp_path)
    edit_config(src, init_lora_weights="pissa_niter_4")
    with pytest.raises(AdapterImportError, match="rewrote the base weights"):
        import_peft_adapter(tiny_llama(), src)


def test_adapter_for_another_base_is_refused(tmp_path):
    src, _ = make_peft(tiny_llama, tmp_path)
    wider = llama(intermediate_size=64)
    with pytest.raises(BaseMismatchError, match=r"gate_proj.*expected \[r, 32\] / \[64, r\]"):
        import_peft_adapter(wider, src)
    deeper_src, _ = make_peft(lambda: llama(num_hidden_layers=3), tmp_path / "deep")
    with pytest.raises(BaseMismatchError, match="layer 2 exists.*2 layers"):
        import_peft_adapter(tiny_llama(), deeper_src)


def test_rank_disagreeing_with_config_is_refused(tmp_path):
    src, _ = make_peft(tiny_llama, tmp_path)
    edit_config(src, r=8)
    with pytest.raises(AdapterImportError, match="rank 4 in the weights but 8"):
        import_peft_adapter(tiny_llama(), src)


class _Payload:
    """Unpickling this creates a marker file (if anything ever unpickled it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_peft_weights_are_not_opened(tmp_path):
    src, _ = make_peft(tiny_llama, tmp_path)
    (src / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (src / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(AdapterImportError, match="adapter_model.bin, a pickle file"):
        import_peft_adapter(tiny_llama(), src)
    assert not marker.exists()


def test_cli_converts_with_only_the_base_config(tmp_path, capsys):
    from milora.model.importers.cli import main

    src, expected = make_peft(tiny_llama, tmp_path, rank_pattern={"o_proj": 2})
    tiny_llama().save_pretrained(tmp_path / "base")
    assert main([str(src), str(tmp_path / "out"), "--base", str(tmp_path / "base")]) == 0
    model = MiloraModel.from_pretrained(tiny_llama(), tmp_path / "out").eval()
    torch.testing.assert_close(our_logits(model), expected, **close("torch", "logits"))
    # Errors are reported, typed messages, not tracebacks.
    assert main([str(src), str(tmp_path / "out2"), "--base", str(tmp_path / "base"), "--top-k", "2"]) == 2
    assert "top_k and alpha apply to reference-code checkpoints only" in capsys.readouterr().err
