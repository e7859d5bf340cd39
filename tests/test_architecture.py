"""The import rules of docs/architecture.md, read from the source: every `import milora.X` and
`from milora.X import ...` (at module level or inside a function, where most of the heavy
imports live) is an edge between two parts of the package, and each part may only reach the
parts listed below. The torch-free parts (format, runtime, serve) may not import torch,
transformers or onnx at all: they must run on a box that has only onnxruntime and numpy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "milora"

# part -> the parts it may import (besides itself). Lower layers first; docs/architecture.md
# draws the same picture.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "cli_errors": {"errors"},
    "progress": {"errors"},
    "stages": {"errors", "format"},
    "format": {"errors"},
    "runtime": {"errors", "cli_errors", "format"},
    "serve": {"errors", "cli_errors", "format", "runtime"},
    "plugins": {"errors", "cli_errors", "format", "progress", "runtime"},
    "model": {"errors", "cli_errors", "format"},
    "export": {"errors", "cli_errors", "progress", "format", "model", "plugins"},
    "calibration": {"errors", "cli_errors", "progress", "format", "export", "runtime", "train"},
    "assets": {"errors", "progress", "format"},
    "train": {"errors", "cli_errors", "progress", "format", "model", "runtime", "assets"},
    "assets_cli": {"errors", "cli_errors", "assets", "train"},
    "demo_view": {"errors", "format"},
    "demo_build": {"errors", "stages", "format", "assets", "train", "export"},
    "demo": {"errors", "cli_errors", "progress", "stages", "format", "assets", "train", "runtime", "demo_build",
             "demo_view"},
    "milora": set(),  # milora/__init__.py
}
TORCH_FREE = {"errors", "cli_errors", "progress", "stages", "format", "runtime", "serve", "demo_view"}
HEAVY = ("torch", "transformers", "peft", "onnx", "onnxscript", "onnx_ir")
# milora-quantize edits ONNX graphs (onnx, onnxruntime's quantizers) but runs without PyTorch.
NO_TORCH = {"calibration"}
TORCH = ("torch", "transformers", "peft")


def part_of(module: str) -> str:
    """milora.runtime.engine -> runtime; milora.assets -> assets; milora -> milora."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "milora"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "milora":  # from milora import assets, demo
                found += [(node.lineno, f"milora.{a.name}") for a in node.names]
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        part = part_of(module)
        if part not in ALLOWED:
            bad.append(f"{rel}: part {part!r} is not in the architecture (add it to ALLOWED and "
                       "docs/architecture.md)")
            continue
        for line, module in imports(path):
            top = module.split(".")[0]
            if top == "milora" and module != "milora":
                target = part_of(module)
                if target != part and target not in ALLOWED[part]:
                    bad.append(f"{rel}:{line}: {part} imports {module} ({target} is not below {part})")
            elif part in TORCH_FREE and top in HEAVY:
                bad.append(f"{rel}:{line}: {part} imports {module} but must run without {', '.join(HEAVY)}")
            elif part in NO_TORCH and top in TORCH:
                bad.append(f"{rel}:{line}: {part} imports {module} but must run without {', '.join(TORCH)}")
    return bad


def test_every_import_follows_the_layers():
    assert violations() == []


def test_a_planted_upward_import_is_caught(tmp_path):
    """The check reads what it should: a format module importing the exporter, a runtime module
    importing torch inside a function, and an unknown part are each reported."""
    import shutil

    copy = tmp_path / "milora"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "format" / "bad.py").write_text("from milora.export.exporter import export\n")
    (copy / "runtime" / "bad.py").write_text("def f():\n    import torch\n")
    (copy / "newpart.py").write_text("")
    found = violations(copy)
    assert any("format/bad.py:1: format imports milora.export.exporter" in v for v in found), found
    assert any("runtime/bad.py:2: runtime imports torch" in v for v in found), found
    assert any("newpart.py: part 'newpart'" in v for v in found), found
    assert len(found) == 3, found


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_the_architecture_names_only_parts_that_exist(part):
    assert part == "milora" or (PACKAGE / part).is_dir() or (PACKAGE / f"{part}.py").is_file(), part


def test_the_doc_draws_every_part():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [p for p in ALLOWED if p != "milora" and f"`{p}`" not in doc]
    assert missing == [], f"docs/architecture.md does not describe {missing}"


def test_every_command_points_at_a_function_that_exists():
    """pyproject's [project.scripts]: each milora-* command's module imports and names a
    callable (a moved main() would otherwise only fail once installed)."""
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 8
    for command, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr, None)), f"{command} -> {target}"
