"""The milora runtime: serve many tenants from one exported directory with onnxruntime.
Imports neither torch nor transformers (numpy, onnxruntime, tokenizers, safetensors only)."""

from milora.runtime.sampling import SamplingParams

__all__ = ["Engine", "Request", "SamplingParams"]


def __getattr__(name):
    if name in ("Engine", "Request"):
        from milora.runtime import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'milora.runtime' has no attribute {name!r}")
