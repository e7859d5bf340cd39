"""The runtime must run from OUT_DIR alone on a box without PyTorch."""

import subprocess
import sys


def test_runtime_imports_no_torch_or_transformers():
    code = ("import sys, milora.runtime, milora.runtime.engine, milora.runtime.cli; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"runtime imported {proc.stdout.strip()} {proc.stderr[-500:]}"
