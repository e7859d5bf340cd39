"""The docs stand alone: every docs/*.md that the repository mentions exists, and the bad-input
matrix (docs/errors.md) and its tests (tests/test_errors_*.py) name each other one to one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mentions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "pyproject.toml", *ROOT.glob("docs/*.md"),
             *ROOT.glob("milora/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]
    for f in files:
        for name in re.findall(r"\b(?:docs/)?([A-Za-z][\w-]*\.md)\b", f.read_text()):
            found.setdefault(name, []).append(str(f.relative_to(ROOT)))
    return found


def test_every_mentioned_doc_exists():
    top = {"README.md", "BENCHMARKS.md"}
    missing = {n: where for n, where in _mentions().items()
               if n not in top and not (ROOT / "docs" / n).is_file() and n != "results.md"}
    assert not missing, missing


def test_error_rows_and_tests_name_each_other():
    doc = (ROOT / "docs" / "errors.md").read_text()
    tests = {m for f in ROOT.glob("tests/test_errors_*.py")
             for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    named = set(re.findall(r"(?<![/\w])(test_\w+)(?![\w.*])", doc))  # not tests/test_x.py
    assert tests - named == set(), "tests missing from docs/errors.md"
    assert named - tests == set(), "docs/errors.md names tests that do not exist"
    rows = [int(n) for n in re.findall(r"^\| (\d+) \|", doc, re.M)]
    assert rows == list(range(1, len(rows) + 1)) and len(rows) >= 24
    assert "## Runtime inputs" in doc
