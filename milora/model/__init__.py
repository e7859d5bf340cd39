"""The PyTorch reference of MiLoRA: the semantics every backend is tested against.

Importing this package does not import torch; the names below load on first use.
"""

_LAZY = {
    "MiloraConfig": "milora.format.config",
    "MiloraModel": "milora.model.model",
    "MiloraOutput": "milora.model.model",
    "add_milora": "milora.model.model",
    "load_milora": "milora.model.model",
    "RoutingState": "milora.model.routing",
    "MiloraRouter": "milora.model.router",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'milora.model' has no attribute {name!r}")
