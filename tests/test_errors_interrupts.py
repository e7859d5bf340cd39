"""Bad-input matrix, "Interrupts" (docs/errors.md): Ctrl-C (SIGINT) during an export or a
training run exits 130 with one line and no traceback, and an export leaves no partial
directory; the partial directory of a killed export is removed by the next export once its
process is gone, and left alone while it runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import milora
from errors_helpers import fails
from export_helpers import make_model_dir
from milora.export import cli as export_cli
from milora.format.config import MiloraConfig

REPO = Path(milora.__file__).resolve().parent.parent
# Runs a command's main() in a child process with one function replaced by a stand-in that
# marks the file argv[1] and then waits: the parent interrupts the command right there.
CHILD = """
import importlib, sys, time
from pathlib import Path
module, function, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
def mid_work(*args, **kwargs):
    marker.write_text("reached")
    while True:
        time.sleep(0.05)
setattr(importlib.import_module(module), function, mid_work)
cli = importlib.import_module(sys.argv[4])
sys.exit(cli.main(sys.argv[5:]))
"""


def interrupt_mid_work(tmp_path: Path, module: str, function: str, cli: str, argv: list, inspect=None):
    """Run the command, send SIGINT once it reached `function`; (return code, stderr)."""
    marker = tmp_path / "reached"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, module, function, str(marker), cli, *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate(timeout=60)
                pytest.fail(f"the command ended before reaching {function}: {proc.returncode}\n{err}")
            time.sleep(0.05)
        if inspect is not None:
            inspect(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_ctrl_c_during_export(tmp_path):
    model_dir = make_model_dir(tmp_path, {"solo": MiloraConfig(rank=2, alpha=4)})
    out = tmp_path / "out"
    seen = {}

    def inspect(pid):  # mid-work: the slot pack is already written into the partial directory
        seen["partial"] = (tmp_path / f".out.partial-{pid}" / "adapters" / "solo.safetensors").is_file()

    code, err = interrupt_mid_work(tmp_path, "milora.export.onnx_export", "export_graph", "milora.export.cli",
                                   [model_dir, out, "--quiet", "--no-validate"], inspect)
    assert seen["partial"]
    assert code == 130, err
    assert err.strip().splitlines() == ["milora-export: interrupted"], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_ctrl_c_during_training(capsys, tmp_path, monkeypatch):
    """In-process (the subprocess above shows a real SIGINT becomes KeyboardInterrupt and the same
    handler; a second child would cost the suite another torch start-up): Ctrl-C in the middle of
    the training loop is one line and exit 130."""
    from helpers import tiny_llama
    from milora.train import cli as train_cli
    from milora.train import loop
    from train_helpers import char_tokenizer

    tiny_llama(0).save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "ab"}) + "\n" for i in range(6)))
    calls = []
    real = loop.micro_batch

    def ctrl_c_at_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # one optimizer step done, the second under way
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "micro_batch", ctrl_c_at_second_batch)
    code = train_cli.main([str(a) for a in ["--base", tmp_path / "base", "--data", data, "--out", tmp_path / "adapter",
                                            "--no-progress", "--max-steps", "3", "--rank", "2"]])
    err = capsys.readouterr().err
    assert code == 130, err
    assert err.strip().splitlines() == ["milora-train: interrupted"], err


def test_stale_partial_directory_of_a_killed_export(capsys, tmp_path):
    """.OUT.partial-PID of a process that is gone is removed by the next export; one whose
    process is alive is another export at work and is left alone."""
    gone = subprocess.Popen(["true"])  # noqa: S607
    gone.wait()  # exited and reaped: its PID names no process
    alive_proc = subprocess.Popen(["sleep", "60"])  # noqa: S607
    try:
        dead = tmp_path / f".out.partial-{gone.pid}"
        alive = tmp_path / f".out.partial-{alive_proc.pid}"
        other = tmp_path / ".other.partial-1"  # another OUT_DIR's: not this export's to judge
        for d in (dead, alive, other):
            d.mkdir()
            (d / "prefill.onnx").write_bytes(b"half")
        # The next export (it fails later: the model directory does not exist) cleans up first.
        fails(capsys, export_cli.main, [tmp_path / "model", tmp_path / "out", "--quiet"], "does not exist")
        assert not dead.exists()
        assert (alive / "prefill.onnx").is_file() and other.is_dir()
    finally:
        alive_proc.kill()
        alive_proc.wait()
