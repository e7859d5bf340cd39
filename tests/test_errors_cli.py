"""Bad-input matrix, "Command-line arguments" (docs/errors.md): every command refuses missing,
contradictory and out-of-range arguments with exit status 2 and one line, before any work."""

from __future__ import annotations

import json

import pytest

from errors_helpers import fails
from milora import assets, demo
from milora.export import cli as export_cli
from milora.model.importers import cli as import_cli
from milora.runtime import cli as generate_cli
from milora.train import cli as train_cli
from milora.train import eval_cli


# ---- milora-export ----

def test_export_without_model_and_out_dir(capsys, tmp_path):
    fails(capsys, export_cli.main, [], "MODEL_DIR and OUT_DIR are missing", "expected milora-export MODEL_DIR OUT_DIR",
          "Fix:")
    fails(capsys, export_cli.main, [tmp_path], "OUT_DIR is missing", "Fix:")


def test_export_check_with_export_arguments(capsys, tmp_path):
    fails(capsys, export_cli.main, [tmp_path / "model", "--check", tmp_path / "out"],
          "--check OUT_DIR verifies an existing export and takes no MODEL_DIR", "expected either", "Fix:")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_export_slots_not_positive(capsys, tmp_path, value):
    fails(capsys, export_cli.main, [tmp_path / "model", tmp_path / "out", "--slots", value],
          f"--slots {value} is out of range", "expected at least 1", "Fix: pass --slots N")
    assert not (tmp_path / "out").exists()


def test_export_decode_steps_zero(capsys, tmp_path):
    fails(capsys, export_cli.main, [tmp_path / "model", tmp_path / "out", "--decode-steps", "0"],
          "--decode-steps 0 is out of range", "expected at least 1", "Fix:")
    fails(capsys, export_cli.main, ["--check", tmp_path / "out", "--decode-steps", "0"], "--decode-steps 0")


def test_export_torch_threads_zero(capsys, tmp_path):
    fails(capsys, export_cli.main, [tmp_path / "model", tmp_path / "out", "--torch-threads", "0"],
          "--torch-threads 0 is out of range", "expected at least 1", "Fix: pass --torch-threads 1")


def test_export_opset_out_of_range(capsys, tmp_path):
    fails(capsys, export_cli.main, [tmp_path / "model", tmp_path / "out", "--opset", "99"],
          "--opset 99 is out of range", "expected 14..20", "Fix: pass --opset 18")


def test_export_malformed_adapter_option(capsys, tmp_path):
    fails(capsys, export_cli.main, [tmp_path / "model", tmp_path / "out", "--adapter", "nodir"],
          "--adapter 'nodir' is malformed", "expected NAME=DIR", "Fix: e.g. --adapter acme=./acme")
    fails(capsys, export_cli.main, [tmp_path / "m", tmp_path / "o", "--adapter", "a=x", "--adapter", "a=y"],
          "--adapter a=... is given twice", "Fix:")


def test_export_unknown_choice_or_flag(capsys, tmp_path):
    fails(capsys, export_cli.main, [tmp_path / "model", tmp_path / "out", "--dtype", "fp8"],
          "argument --dtype: invalid choice: 'fp8'", "fp32", "see milora-export --help")
    fails(capsys, export_cli.main, [tmp_path / "model", tmp_path / "out", "--slots", "many"],
          "argument --slots: invalid int value: 'many'")
    fails(capsys, export_cli.main, [tmp_path / "model", tmp_path / "out", "--frobnicate"],
          "unrecognized arguments: --frobnicate")


# ---- milora-generate (argument checks come before OUT_DIR is opened) ----

def test_generate_max_new_tokens_zero(capsys, tmp_path):
    fails(capsys, generate_cli.main, [tmp_path, "--tenant", "a", "--prompt", "hi", "--max-new-tokens", "0"],
          "--max-new-tokens 0 is out of range", "expected a positive number", "Fix: pass --max-new-tokens 1")


@pytest.mark.parametrize("flag", ["--max-batch", "--threads"])
def test_generate_runtime_numbers_not_positive(capsys, tmp_path, flag):
    fails(capsys, generate_cli.main, [tmp_path, "--tenant", "a", "--prompt", "hi", flag, "0"],
          f"{flag} 0 is out of range", "Fix:")


def test_generate_contradictory_modes(capsys, tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"tenant": "a", "prompt": "x"}\n')
    fails(capsys, generate_cli.main, [tmp_path, "--prompt", "x", "--batch", batch],
          "argument --batch: not allowed with argument --prompt")
    fails(capsys, generate_cli.main, [tmp_path, "--tenant", "a", "--prompt", "x", "--output", tmp_path / "r.jsonl"],
          "--output writes --batch results and does not apply to --prompt", "Fix: drop --output")
    fails(capsys, generate_cli.main, [tmp_path, "--batch", batch, "--tenant", "a"],
          "--tenant does not apply to --batch", "Fix: drop --tenant")
    fails(capsys, generate_cli.main, [tmp_path], "one of the arguments --prompt --chat --batch --list-tenants is "
                                                 "required")


def test_generate_prompt_without_tenant(capsys, tmp_path):
    fails(capsys, generate_cli.main, [tmp_path, "--prompt", "x"], "--tenant is required with --prompt",
          "expected --tenant NAME", "Fix: pick a name from milora-generate OUT_DIR --list-tenants")


# ---- milora-train (checked before the base model is loaded) ----

def _train(tmp_path, *extra):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    return ["--base", tmp_path / "no-base", "--data", data, "--out", tmp_path / "a", "--no-progress", *extra]


def test_train_rank_zero(capsys, tmp_path):
    fails(capsys, train_cli.main, _train(tmp_path, "--rank", "0"), "rank=0", "expected a positive integer",
          "Fix: set rank >= 1")
    assert not (tmp_path / "a").exists()


def test_train_top_k_above_experts(capsys, tmp_path):
    fails(capsys, train_cli.main, _train(tmp_path, "--top-k", "8"), "top_k=8 is out of range",
          "expected an integer in 1..7", "Fix: set top_k between 1 and 7")
    fails(capsys, train_cli.main, _train(tmp_path, "--top-k", "3", "--target-modules", "q_proj", "v_proj"),
          "top_k=3 is out of range", "1..2", "q_proj, v_proj")


@pytest.mark.parametrize("flag", ["--max-steps", "--batch-size", "--grad-accum", "--train-limit"])
def test_train_counts_not_positive(capsys, tmp_path, flag):
    fails(capsys, train_cli.main, _train(tmp_path, flag, "0"), f"{flag} 0 is out of range", "at least 1",
          f"Fix: pass {flag} 1 or more")


def test_train_lora_with_top_k(capsys, tmp_path):
    fails(capsys, train_cli.main, _train(tmp_path, "--lora", "--top-k", "2"), "--top-k 2 contradicts --lora",
          "expected one of them", "Fix: drop --top-k")


def test_train_missing_or_contradictory_source(capsys, tmp_path):
    fails(capsys, train_cli.main, ["--base", "b", "--out", "o"], "one of the arguments --task --data is required")
    fails(capsys, train_cli.main, ["--base", "b", "--out", "o", "--task", "arc_e", "--data", "d.jsonl"],
          "argument --data: not allowed with argument --task")


# ---- milora-eval ----

@pytest.mark.parametrize("flag", ["--limit", "--max-new-tokens"])
def test_eval_counts_not_positive(capsys, tmp_path, flag):
    fails(capsys, eval_cli.main, ["--base", tmp_path, "--task", "arc_e", flag, "0"], f"{flag} 0 is out of range",
          "expected a positive number", "Fix:")


# ---- milora-import ----

@pytest.fixture
def base_config_dir(tmp_path):
    from helpers import tiny_llama

    config = tiny_llama(0).config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_import_top_k_out_of_range(capsys, tmp_path, base_config_dir):
    fails(capsys, import_cli.main, [tmp_path / "src", tmp_path / "out", "--base", base_config_dir, "--top-k", "9"],
          "--top-k 9 is out of range", "expected 1..7", "Fix:")
    fails(capsys, import_cli.main, [tmp_path / "src", tmp_path / "out", "--base", base_config_dir, "--alpha", "-1"],
          "--alpha -1.0 is out of range", "expected a positive number", "Fix:")


def test_import_top_k_for_a_peft_adapter(capsys, tmp_path, base_config_dir):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    fails(capsys, import_cli.main, [tmp_path / "peft", tmp_path / "out", "--base", base_config_dir, "--top-k", "2"],
          "top_k and alpha apply to reference-code checkpoints only", "PEFT adapter", "Fix: drop --top-k")
    assert not (tmp_path / "out").exists()


def test_import_missing_base(capsys, tmp_path):
    fails(capsys, import_cli.main, [tmp_path / "src", tmp_path / "out"], "the following arguments are required: "
                                                                         "--base")


# ---- milora-assets and milora-demo ----

def test_assets_without_subcommand_or_bad_cache(capsys, tmp_path):
    fails(capsys, assets.main, [], "the following arguments are required", "see milora-assets --help")
    fails(capsys, assets.main, ["sideload"], "invalid choice: 'sideload'")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    fails(capsys, assets.main, ["smollm2", "--cache", not_a_dir], f"--cache {not_a_dir} exists and is not a directory",
          "expected a directory", "Fix:")


@pytest.mark.parametrize("flag", ["--per-tenant", "--max-new-tokens"])
def test_demo_counts_not_positive(capsys, tmp_path, flag):
    fails(capsys, demo.main, ["--cache", tmp_path, flag, "0"], f"{flag} 0 is out of range", "Fix:")
    assert not list(tmp_path.iterdir())  # refused before any work


def test_flavour_fused_where_it_cannot_apply(capsys, tmp_path):
    """Row 85: the tiny model's head dim is 8 (GroupQueryAttention needs a multiple of 16); the
    other reasons given are listed too, and nothing is written."""
    from export_helpers import make_model_dir
    from milora.format.config import MiloraConfig

    model_dir = make_model_dir(tmp_path / "src", {"solo": MiloraConfig(rank=2, alpha=4, top_k=2)})
    fails(capsys, export_cli.main, [model_dir, tmp_path / "out", "--quiet", "--flavour", "fused", "--target",
                                    "tensorrt", "--prefill-logits", "all"],
          "--flavour fused does not apply", "head", "target tensorrt", "--prefill-logits all",
          "Fix: pass --flavour portable")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
