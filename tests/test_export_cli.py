"""milora-export's command line: an export and its --check, a tampered directory, and a failure
mid-export (exit 2, no half-written OUT_DIR). The other bad inputs are rows of the
matrix in docs/errors.md, tested in tests/test_errors_*.py."""

from __future__ import annotations

import pytest

from export_helpers import make_model_dir
from milora.export.cli import main
from milora.format.config import MiloraConfig

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


def test_failure_mid_export_leaves_nothing(model_dir, tmp_path, capsys, monkeypatch):
    """A failure after graphs were written (here: validation) removes the temporary dir."""
    from milora.errors import ValidationError
    from milora.export import exporter

    def broken(*args, **kwargs):
        raise ValidationError("injected failure")

    monkeypatch.setattr(exporter, "run_validation", broken)
    _fails(capsys, [str(model_dir), str(tmp_path / "out"), "--quiet"], "injected failure")
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


def test_flavour_choice_reaches_the_manifest(tmp_path, capsys):
    """--flavour portable on a model that auto would export fused (head dim 16), and auto picks fused."""
    from milora.format import manifest as mf

    src = make_model_dir(tmp_path / "src", ONE, hidden=64)
    for flavour, expected in (("portable", mf.FLAVOUR_PORTABLE), ("auto", mf.FLAVOUR_FUSED)):
        out = tmp_path / flavour
        assert main([str(src), str(out), "--quiet", "--decode-steps", "1", "--flavour", flavour]) == 0
        assert mf.read_manifest(out)["flavour"] == expected
    capsys.readouterr()
