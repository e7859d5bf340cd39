"""milora-export's command line: every failure mode of the issue exits 2 with a clear message
and no traceback, leaves no half-written OUT_DIR; --check refuses a tampered directory."""

from __future__ import annotations

import shutil

import pytest

from export_helpers import make_model_dir
from helpers import tenant, tiny_llama
from milora.export.cli import main
from milora.model.config import MiloraConfig

ONE = {"solo": MiloraConfig(rank=2, alpha=4, top_k=2)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("cli_src"), ONE)


def _fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "milora-export: error:" in err and "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def _no_partials(parent):
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


def test_export_then_check_then_tamper(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(model_dir), str(out), "--quiet", "--decode-steps", "1"]) == 0
    assert "validation" in capsys.readouterr().out
    assert main(["--check", str(out), "--decode-steps", "1"]) == 0
    assert '"sha256": "ok"' in capsys.readouterr().out
    # The weights file both graphs share is covered like every other file.
    for name in ("adapters/solo.safetensors", "weights.onnx.data"):
        data = bytearray((out / name).read_bytes())
        data[-1] ^= 0xFF
        (out / name).write_bytes(bytes(data))
    _fails(capsys, ["--check", str(out)], "adapters/solo.safetensors changed", "weights.onnx.data changed",
           "export it again")


def test_non_empty_out_dir_needs_force(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _fails(capsys, [str(model_dir), str(out), "--no-validate", "--quiet"], "not empty", "--force")
    assert (out / "keep.txt").read_text() == "user data"
    assert main([str(model_dir), str(out), "--no-validate", "--quiet", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_missing_model_dir(tmp_path, capsys):
    _fails(capsys, [str(tmp_path / "nope"), str(tmp_path / "out")], "does not exist")
    assert not (tmp_path / "out").exists()


def test_corrupt_weights_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    _fails(capsys, [str(bad), str(tmp_path / "out")], "corrupt")
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


def test_corrupt_adapter_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    (bad / "adapters" / "solo" / "milora_adapter.safetensors").write_bytes(b"\x00" * 10)
    _fails(capsys, [str(bad), str(tmp_path / "out")], "milora_adapter.safetensors", "corrupt")
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


def test_adapter_for_another_base(model_dir, tmp_path, capsys):
    other = tenant(5, builder=lambda seed: tiny_llama(seed, layers=3), config=MiloraConfig(rank=2, alpha=2))
    other.save_adapter(tmp_path / "other")
    _fails(capsys, [str(model_dir), str(tmp_path / "out"), "--adapter", f"x={tmp_path / 'other'}"],
           "another base model", "num_layers")
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    _fails(capsys, [str(tmp_path / "gpt2"), str(tmp_path / "out")], "GPT2LMHeadModel", "LlamaForCausalLM")


def test_more_tenants_than_slots(tmp_path, capsys):
    md = make_model_dir(tmp_path, {"a": MiloraConfig(rank=2, alpha=2), "b": MiloraConfig(rank=2, alpha=2)})
    _fails(capsys, [str(md), str(tmp_path / "out"), "--slots", "2"], "2 tenants", "--slots 3")
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


def test_failure_mid_export_leaves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    """A failure after graphs were written (here: validation) removes the temporary dir."""
    from milora.errors import ValidationError
    from milora.export import exporter

    def broken(*args, **kwargs):
        raise ValidationError("injected failure")

    monkeypatch.setattr(exporter, "run_validation", broken)
    _fails(capsys, [str(model_dir), str(tmp_path / "out"), "--quiet"], "injected failure")
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


def test_malformed_adapter_option(model_dir, tmp_path, capsys):
    _fails(capsys, [str(model_dir), str(tmp_path / "out"), "--adapter", "nodir"], "NAME=DIR")
