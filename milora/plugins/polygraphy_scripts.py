"""The Polygraphy data-loader scripts milora-export writes into OUT_DIR (one per graph):

    OUT_DIR/polygraphy/prefill_data.py, OUT_DIR/polygraphy/decode_data.py

Each is milora/plugins/polygraphy_data.py with its GRAPH line set; it stands alone (numpy and
safetensors; tokenizers and onnxruntime when present) and finds OUT_DIR next to itself. They
are written before the manifest, so the manifest's file hashes cover them like every file.
"""

from __future__ import annotations

from pathlib import Path

LOADER_DIR = "polygraphy"
GRAPHS = ("prefill", "decode")
_TEMPLATE = Path(__file__).with_name("polygraphy_data.py")
_GRAPH_LINE = 'GRAPH = "prefill"  # milora-export writes each graph\'s name here'


def loader_file(graph: str) -> str:
    """Path of a graph's loader script relative to OUT_DIR."""
    return f"{LOADER_DIR}/{graph}_data.py"


def loader_source(graph: str) -> str:
    text = _TEMPLATE.read_text(encoding="utf-8")
    if _GRAPH_LINE not in text:
        raise RuntimeError(f"{_TEMPLATE} lost its GRAPH line; update milora/plugins/polygraphy_scripts.py")
    return text.replace(_GRAPH_LINE, f"GRAPH = {graph!r}  # written by milora-export")


def write_loader_scripts(out_dir: str | Path) -> list[Path]:
    """Write OUT_DIR/polygraphy/<graph>_data.py for both graphs; returns their paths."""
    out_dir = Path(out_dir)
    (out_dir / LOADER_DIR).mkdir(exist_ok=True)
    paths = []
    for graph in GRAPHS:
        path = out_dir / loader_file(graph)
        path.write_text(loader_source(graph), encoding="utf-8")
        paths.append(path)
    return paths
