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


@pytest.fixture(scope="session")
def tiny_fused_export(tmp_path_factory):
    """tiny_export with head dim 16: the fused graph flavour (GroupQueryAttention needs D % 16 == 0)."""
    return export_tiny(tmp_path_factory.mktemp("tiny_fused_export"), hidden=64)


@pytest.fixture(scope="session", params=["portable", "fused"])
def tiny_any_export(request):
    """tiny_export and tiny_fused_export in turn: runtime tests that hold for every flavour."""
    return request.getfixturevalue("tiny_export" if request.param == "portable" else "tiny_fused_export")
