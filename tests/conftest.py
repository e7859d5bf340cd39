"""Shared fixtures: the tiny random models and exports most tests build on (nothing is
downloaded; everything is made in-process). Builders live in helpers.py (tiny models and
tenants), export_helpers.py (a model directory with tenants of every option) and
runtime_helpers.py (an exported directory with a word-level tokenizer)."""

from __future__ import annotations

import pytest

from runtime_helpers import export_tiny


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(model_dir, out_dir): the tiny Llama with tenants alpha, beta, gamma, delta (rank,
    k, pooler, activation, position and gate mode all differ), exported and validated once per
    session. Read-only: a test that changes files works on a copy."""
    return export_tiny(tmp_path_factory.mktemp("tiny_export"))
