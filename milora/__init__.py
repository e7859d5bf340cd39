"""milora: deploy MiLoRA-fine-tuned language models, many tenants on one base model.

The runtime side imports no torch; the PyTorch names below load lazily on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "MiloraConfig": "milora.format.config",
    "MiloraModel": "milora.model.model",
    "add_milora": "milora.model.model",
    "load_milora": "milora.model.model",
    "RoutingState": "milora.model.routing",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'milora' has no attribute {name!r}")
