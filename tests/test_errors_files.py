"""Bad-input matrix, "File system" (docs/errors.md): an OUT_DIR that cannot be written (read-only
location, full disk) fails with a typed one-line error naming the path and nothing half-written
left behind; tenant names that would escape the output directory are refused before any file
is written."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from errors_helpers import fails, nothing_written
from export_helpers import make_model_dir
from helpers import tiny_llama
from milora.export import cli as export_cli
from milora.format.config import MiloraConfig
from milora.model.importers import cli as import_cli
from milora.runtime import cli as generate_cli
from milora.train import cli as train_cli

ONE = {"solo": MiloraConfig(rank=2, alpha=4, top_k=2)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("files_src"), ONE)


def _writable(directory: Path) -> bool:
    probe = directory / ".probe"
    try:
        probe.mkdir()
    except OSError:
        return False
    probe.rmdir()
    return True


def test_out_dir_not_empty_without_force(capsys, tmp_path, model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    fails(capsys, export_cli.main, [model_dir, out, "--no-validate", "--quiet"], f"OUT_DIR {out} is not empty",
          "expected a new or empty directory", "Fix: choose another directory or pass --force")
    assert (out / "keep.txt").read_text() == "user data"
    assert export_cli.main([str(model_dir), str(out), "--no-validate", "--quiet", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_read_only_out_dir_parent(capsys, tmp_path, model_dir):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if not _writable(parent):  # an ordinary user: the permission bits hold
            out = parent / "out"
        elif Path("/sys").is_dir() and not _writable(Path("/sys")):  # root ignores them; /sys is read-only
            out = Path("/sys") / "milora-test-out"
        else:
            pytest.skip("no read-only directory available to this user")
        fails(capsys, export_cli.main, [model_dir, out, "--no-validate", "--quiet"],
              f"cannot create a temporary directory for OUT_DIR {out}", f"({out.parent / ('.' + out.name)}.partial-",
              "nothing was written", "Fix: put OUT_DIR in a directory you can write to")
        assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".milora-test-out")
                                         or p.name.startswith(".out.")]
    finally:
        parent.chmod(0o755)


def test_full_disk_during_export(capsys, tmp_path, model_dir, monkeypatch):
    """The last write (manifest.json) hits ENOSPC half-way: no partial directory remains and the
    OUT_DIR that --force would have replaced is untouched."""
    from milora.format import manifest as mf

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous export")

    def full_disk(root, manifest):
        (root / mf.MANIFEST_FILE).write_text('{"format": "milora-exp')  # half-written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / mf.MANIFEST_FILE))

    monkeypatch.setattr(mf, "write_manifest", full_disk)
    fails(capsys, export_cli.main, [model_dir, out, "--no-validate", "--quiet", "--force"],
          f"cannot write the export for OUT_DIR {out}: No space left on device", "manifest.json",
          "nothing was written (the partial directory was removed)", "Fix: free space on that file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_full_disk_during_import(capsys, tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError('... (os error 28)'): still a WriteError."""
    import safetensors.torch
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    src = tmp_path / "peft"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    save_file({key.format(l, w): np.ones((2, 32) if w == "A" else (32, 2), np.float32) for l in (0, 1) for w in "AB"},
              str(src / "adapter_model.safetensors"))
    config = tiny_llama(0).config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path / "base")

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 16)  # half-written
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    fails(capsys, import_cli.main, [src, tmp_path / "out", "--base", tmp_path / "base"],
          f"cannot write the adapter for the adapter directory {tmp_path / 'out'}: No space left on device", "nothing was written", "Fix:")
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "x" * 65])
def test_tenant_names_that_escape_the_out_dir(capsys, tmp_path, model_dir, name):
    before = sorted(p.name for p in tmp_path.iterdir())
    fails(capsys, export_cli.main, [model_dir, tmp_path / "out", "--adapter", f"{name}={model_dir / 'adapters/solo'}",
                                    "--no-validate", "--quiet"],
          f"tenant name {name!r} is not allowed", "expected letters, digits", "Fix: choose a name like 'acme-1'")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path.parent.parent / "x").exists()


def test_generate_output_not_writable(capsys, tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"tenant": "a", "prompt": "x"}\n')
    fails(capsys, generate_cli.main, [tmp_path, "--batch", batch, "--output", tmp_path / "no" / "r.jsonl"],
          f"--output {tmp_path / 'no' / 'r.jsonl'}: its directory {tmp_path / 'no'} does not exist",
          "expected a file path in an existing directory", "Fix:")
    fails(capsys, generate_cli.main, [tmp_path, "--batch", batch, "--output", tmp_path],
          f"--output {tmp_path} is a directory", "expected a file path", "Fix:")


def test_os_error_on_any_command_output(capsys, tmp_path):
    """Any command's OSError (here: milora-train --out naming an existing file) is one line
    naming the path, exit 2 (cli_errors' backstop)."""
    from train_helpers import char_tokenizer

    tiny_llama(0).save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a"}) + "\n" for i in range(4)))
    (tmp_path / "taken").write_text("a file, not a directory")
    fails(capsys, train_cli.main, ["--base", tmp_path / "base", "--data", data, "--out", tmp_path / "taken",
                                   "--no-progress", "--max-steps", "1", "--rank", "2"],
          f"cannot access {tmp_path / 'taken'}: File exists", "Fix: check that the path exists")
    assert (tmp_path / "taken").read_text() == "a file, not a directory"
    shutil.rmtree(tmp_path / "base")
