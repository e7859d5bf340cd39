"""milora.format.outdir.staged_directory: the one atomic directory writer (exports, quantized
exports, imported adapters, the SmolLM2 cache, demo tenants)."""

from __future__ import annotations

import errno

import pytest

from milora.errors import WriteError
from milora.format.outdir import atomic_write_text, staged_directory


def _partials(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


def test_a_finished_block_replaces_the_directory(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staged_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final and tmp.is_dir()
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").is_file()  # untouched until the block ends
    assert [p.name for p in final.iterdir()] == ["new.txt"] and _partials(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_block_leaves_the_old_directory_and_no_partial(tmp_path, exc):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(type(exc)):
        with staged_directory(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise exc
    assert [p.name for p in final.iterdir()] == ["old.txt"] and _partials(tmp_path) == []


def test_an_oserror_while_writing_is_one_write_error(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(WriteError) as err:
        with staged_directory(final, "the adapter directory", "write the adapter") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "w.safetensors"))
    msg = str(err.value)
    assert msg.startswith(f"cannot write the adapter for the adapter directory {final}: No space left on device")
    assert "(the partial directory was removed)" in msg and "put the adapter directory on another one" in msg
    assert not final.exists() and _partials(tmp_path) == []


def test_atomic_write_text_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["a.json"]
