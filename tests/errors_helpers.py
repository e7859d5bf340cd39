"""Shared checks of the bad-input matrix (docs/errors.md): a command fails with exit status 2
and ONE line on stderr, no traceback, naming what was wrong, the value seen, what was expected
and how to fix it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def fails(capsys, main, argv, *needles, status: int = 2) -> str:
    """Run a CLI main(argv) in-process; assert the exit status, one stderr line starting with
    'prog: error:' (or 'prog: interrupted'), no traceback, and every needle in it."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert ": error: " in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def raises(exc_type, call, *needles):
    """call() raises exc_type whose message holds every needle; returns the exception."""
    with pytest.raises(exc_type) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"
    return info.value


def nothing_written(parent: Path, out_name: str = "out") -> bool:
    """No OUT_DIR and no temporary sibling of it under parent."""
    return not (parent / out_name).exists() and not [p for p in parent.iterdir() if ".partial-" in p.name
                                                     or p.name.startswith(f".{out_name}.")]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_manifest(out_dir: Path) -> None:
    """Re-write manifest.json's sha256 table to match the files as they are now (what someone
    hiding a change would do): --check and the runtime must still refuse bad content."""
    from milora.format.manifest import MANIFEST_FILE, file_hashes

    edit_json(out_dir / MANIFEST_FILE, lambda m: m.update(files=file_hashes(out_dir)))


def poison_safetensors(path: Path, tensor: str, values: dict[tuple, float]) -> None:
    """Set some values of one tensor of a safetensors file (numpy; keeps dtype and metadata)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    arr = tensors[tensor].copy()
    for index, value in values.items():
        arr[index] = value
    tensors[tensor] = arr
    save_file(tensors, str(path), metadata=metadata)
