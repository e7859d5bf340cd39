"""milora-train: data, training loop, evaluation and routing statistics for MiLoRA adapters.

    from milora.train import TrainConfig, train, load_task
"""

_LAZY = {
    "TrainConfig": "milora.train.loop",
    "TrainResult": "milora.train.loop",
    "train": "milora.train.loop",
    "Example": "milora.train.data",
    "load_task": "milora.train.data",
    "read_jsonl": "milora.train.data",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'milora.train' has no attribute {name!r}")
