"""The routed LoRA Triton kernel (milora.plugins.kernels) in the Triton interpreter on CPU,
against the PyTorch reference: random shapes (ranks that are not powers of two, sizes that are
not multiples of the blocks, decode and prefill tactics, float32 / float16 / bfloat16, new
tensor and in place) and the edge cases of the op's contract (docs/tensorrt.md). The checks
live in plugins_kernel_checks.py and run in one subprocess with TRITON_INTERPRET=1 (it must be
set before anything imports triton.language); each is reported here as its own test."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: pip install 'milora[kernels]' (triton==3.9.0 installs "
                                     "on CPU) to run the kernel in the Triton interpreter")

import plugins_kernel_checks  # noqa: E402
from plugins_helpers import run_json  # noqa: E402


@pytest.fixture(scope="module")
def results():
    return run_json(["tests/plugins_kernel_checks.py"], interpret=True)


@pytest.mark.parametrize("name", list(plugins_kernel_checks.CHECKS))
def test_kernel_check(results, name):
    assert results[name] == "ok", results[name]
