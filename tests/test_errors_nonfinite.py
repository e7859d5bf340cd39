"""Bad-input matrix, "Non-finite adapters" (docs/errors.md): a NaN or an infinity anywhere in an
adapter is refused at import and at export with NonFiniteError naming the tenant, the tensor and
the NaN / +inf / -inf counts (exit status 2); nothing is written. (The runtime and --check
rows, which need an exported directory, are in test_errors_outdir.py.)"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from errors_helpers import fails, nothing_written, poison_safetensors, raises
from export_helpers import make_model_dir
from helpers import tiny_llama
from milora.format.adapter import read_adapter
from milora.errors import NonFiniteError
from milora.export import cli as export_cli
from milora.format.finite import check_finite
from milora.format.config import MiloraConfig
from milora.model.importers import cli as import_cli
from test_import_reference import reference_package  # noqa: F401 (fixture: the reference code's classes)

ONE = {"solo": MiloraConfig(rank=2, alpha=4, top_k=2)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("nonfinite_src"), ONE)


@pytest.fixture
def copy(model_dir, tmp_path):
    shutil.copytree(model_dir, tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def base_dir(tmp_path):
    config = tiny_llama(0).config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def solo(model_dir):
    return model_dir / "adapters" / "solo" / "milora_adapter.safetensors"


def export_fails(capsys, tmp_path, model_dir, *needles, extra=()):
    fails(capsys, export_cli.main, [model_dir, tmp_path / "out", "--no-validate", "--quiet", *extra], *needles)
    assert nothing_written(tmp_path)


def test_check_finite_counts_each_kind():
    """The one check everything calls: counts NaN, +inf and -inf separately, per tensor."""
    a = np.array([1.0, np.nan, np.inf, -np.inf, np.nan], np.float16)
    err = raises(NonFiniteError, lambda: check_finite({"ok": np.zeros(3), "bad": a, "ids": np.arange(3)}, "pack p"),
                 "pack p holds non-finite values in 1 tensor(s): bad: 4 of 5 values (NaN 2, +inf 1, -inf 1)")
    assert err.problems == [("bad", 2, 1, 1, 5)]
    check_finite({"w": np.ones((2, 2), np.float32), "opts": np.array([1, 2], np.int64)}, "fine")


def test_nan_in_lora_b_refused_at_export(capsys, tmp_path, copy):
    poison_safetensors(solo(copy), "layers.0.q_proj.lora_B", {(0, 0): math.nan, (1, 1): math.nan, (2, 0): math.nan})
    export_fails(capsys, tmp_path, copy, "tenant 'solo'", "layers.0.q_proj.lora_B: 3 of 64 values (NaN 3, +inf 0, "
                 "-inf 0)", "expected finite numbers everywhere", "Fix: retrain the adapter")


def test_inf_in_activation_coefficient_refused_at_export(capsys, tmp_path, copy):
    """Exported with exit 0 before: an inf in a rational coefficient."""
    poison_safetensors(solo(copy), "layers.1.router.act_num", {(2,): math.inf})
    export_fails(capsys, tmp_path, copy, "tenant 'solo'", "layers.1.router.act_num: 1 of 6 values (NaN 0, +inf 1, "
                 "-inf 0)", "Fix:")


def test_noise_and_pooler_weights_are_checked_too(copy):
    noisy = MiloraConfig(rank=2, alpha=4, noisy_gating=True)
    from helpers import tenant

    adapter = copy / "noisy"
    tenant(3, config=noisy).save_adapter(adapter)
    poison_safetensors(adapter / "milora_adapter.safetensors", "layers.0.router.noise_weight", {(0, 0): -math.inf})
    poison_safetensors(adapter / "milora_adapter.safetensors", "layers.1.router.pooler", {(0,): math.nan})
    err = raises(NonFiniteError, lambda: read_adapter(adapter), f"adapter {adapter}",
                 "layers.0.router.noise_weight: 1 of 224 values (NaN 0, +inf 0, -inf 1)",
                 "layers.1.router.pooler: 1 of 32 values (NaN 1, +inf 0, -inf 0)")
    assert len(err.problems) == 2


def test_finite_adapter_overflowing_a_float16_pack(capsys, tmp_path, copy):
    """Finite in float32, but 2e5 * alpha/r does not fit float16 (max 65504)."""
    poison_safetensors(solo(copy), "layers.1.down_proj.lora_B", {(0, 0): 1e5, (1, 0): -1e5})
    export_fails(capsys, tmp_path, copy, "tenant 'solo'", "as a float16 slot pack", "lora_B.down_proj: 2 of",
                 "(NaN 0, +inf 1, -inf 1)", "Fix: rescale the adapter's weights into range or export with --dtype fp32",
                 extra=("--dtype", "fp16"))


def test_nan_in_peft_adapter_refused_at_import(capsys, tmp_path, base_dir):
    from safetensors.numpy import save_file

    src = tmp_path / "peft"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                         "target_modules": ["q_proj"]}))
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    tensors = {key.format(l, w): np.ones((2, 32) if w == "A" else (32, 2), np.float32) for l in (0, 1) for w in "AB"}
    tensors[key.format(1, "B")][3, 1] = np.nan
    tensors[key.format(1, "B")][4, 0] = -np.inf
    save_file(tensors, str(src / "adapter_model.safetensors"))
    fails(capsys, import_cli.main, [src, tmp_path / "out", "--base", base_dir],
          "PEFT adapter", "adapter_model.safetensors holds non-finite values",
          f"{key.format(1, 'B')}: 2 of 64 values (NaN 1, +inf 0, -inf 1)", "Fix:")
    assert nothing_written(tmp_path)


def test_inf_in_reference_checkpoint_refused_at_import(capsys, tmp_path):
    import torch

    from import_helpers import llama
    from test_import_reference import make_reference, save_reference

    base = llama(num_key_value_heads=4, num_hidden_layers=3)
    modules, gatings = make_reference(base, pooler="attn")
    with torch.no_grad():
        gatings[2].lora_gate.w_gate[0, 0] = math.inf
        gatings[0].lora_gate.w_noise[1, 1] = math.nan  # unused at inference, refused all the same
        modules[8].module_b.weight[0, 0] = -math.inf  # layer 1, k_proj
    src = save_reference(tmp_path / "ckpt", modules, gatings)
    base.save_pretrained(tmp_path / "base")
    fails(capsys, import_cli.main, [src, tmp_path / "out", "--base", tmp_path / "base"],
          "reference-code checkpoint", "lora_modules.bin holds non-finite values",
          "[8].module_b.weight (layer 1 k_proj): 1 of", "(NaN 0, +inf 0, -inf 1)", "Fix:")
    modules[8].module_b.weight.data[0, 0] = 0.0
    save_reference(tmp_path / "ckpt", modules, gatings)
    fails(capsys, import_cli.main, [src, tmp_path / "out", "--base", tmp_path / "base"],
          "lora_gatings.bin holds non-finite values in 2 tensor(s)", "[2].lora_gate.w_gate: 1 of 224 values (NaN 0, "
          "+inf 1, -inf 0)", "[0].lora_gate.w_noise: 1 of 224 values (NaN 1")
    assert nothing_written(tmp_path)


def test_non_finite_adapter_refused_by_the_python_api(copy):
    """MiloraModel.from_pretrained (and milora-eval, milora-train --resume) read through
    read_adapter: refused there too."""
    from milora.model.model import MiloraModel

    poison_safetensors(solo(copy), "layers.0.router.weight", {(0, 0): -math.inf})
    raises(NonFiniteError, lambda: MiloraModel.from_pretrained(tiny_llama(0), copy / "adapters" / "solo"),
           "layers.0.router.weight: 1 of 224 values (NaN 0, +inf 0, -inf 1)")
