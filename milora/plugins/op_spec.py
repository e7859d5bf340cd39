"""The routed LoRA op's names and interface, read from milora/export/routed_lora.py without
importing it: that module also defines the op's PyTorch placeholder and imports torch, while
the engine builder and the TensorRT backend must run where torch is absent (a Jetson). The
constants are parsed from its source (ast.literal_eval of its top-level assignments), so they
are never retyped here.

    DOMAIN, OP_TYPE, OP_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION, SPEC
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from typing import Any

NAMES = ("DOMAIN", "OP_TYPE", "OP_VERSION", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "SPEC")
MODULE = "milora.export.routed_lora"


def _read() -> dict[str, Any]:
    loaded = sys.modules.get(MODULE)
    if loaded is not None:
        return {n: getattr(loaded, n) for n in NAMES}
    origin = importlib.util.find_spec(MODULE).origin
    with open(origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), origin)
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in NAMES:
            values[node.targets[0].id] = ast.literal_eval(node.value)
    missing = [n for n in NAMES if n not in values]
    if missing:
        raise ImportError(f"{origin} no longer defines {missing} as literals; update milora/plugins/op_spec.py")
    return values


_VALUES = _read()
DOMAIN: str = _VALUES["DOMAIN"]
OP_TYPE: str = _VALUES["OP_TYPE"]
OP_VERSION: int = _VALUES["OP_VERSION"]
PLUGIN_NAMESPACE: str = _VALUES["PLUGIN_NAMESPACE"]
PLUGIN_VERSION: str = _VALUES["PLUGIN_VERSION"]
SPEC: dict = _VALUES["SPEC"]
