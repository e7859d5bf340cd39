"""README.md's "## Python API" code is run as a test (Polygraphy's habit: docs that run).

docs/api-snippet.py is the same example kept as a file (the README's block is pasted from
it); it is run too, so the example is checked even while the README is being written.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SNIPPET = ROOT / "docs" / "api-snippet.py"


def python_api_blocks(text: str) -> list[str]:
    """The ```python blocks between the '## Python API' heading and the next heading of the
    same or a higher level."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if re.fullmatch(r"##\s+Python API\s*", l.strip())), None)
    if start is None:
        return []
    blocks, current, fenced = [], None, False
    for line in lines[start + 1:]:
        if line.strip().startswith("```") and current is None:
            fenced = not fenced  # a '# comment' inside any fence is not a heading
        if not fenced and current is None and re.match(r"#{1,2}\s", line):
            break
        if current is None and re.fullmatch(r"```\s*python\s*", line.strip()):
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current, fenced = None, False
        elif current is not None:
            current.append(line)
    return blocks


def test_block_extraction():
    text = ("# t\n## Python API\nintro\n```python\n# a comment, not a heading\nx = 1\n```\n```bash\n# no\n```\n"
            "### sub\n```python\ny = x\n```\n## Next\n```python\nz\n```\n")
    assert python_api_blocks(text) == ["# a comment, not a heading\nx = 1", "y = x"]
    assert python_api_blocks("# nothing here\n") == []


def test_readme_python_api_runs(tmp_path, monkeypatch):
    assert README.is_file(), f"{README} is missing"
    blocks = python_api_blocks(README.read_text())
    assert blocks, f"README.md has no ```python block under '## Python API' (paste {SNIPPET.name} there)"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:  # blocks share a namespace, as a reader running them in order would
        exec(compile(block, str(README), "exec"), namespace)


def test_api_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(SNIPPET), run_name="__snippet__")
    # The snippet's promises, checked here too: k = 1 expert per layer, routing reused by generate.
    routing = ns["routing"]
    assert ((routing.gates != 0).sum(-1) == 1).all()
    assert ns["tokens"][0, :6].tolist() == ns["prompt"][0].tolist() and ns["tokens"].shape[1] > 6
