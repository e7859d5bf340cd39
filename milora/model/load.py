"""Loading a Hugging Face base model with milora's checks (one home for milora-export,
milora-train, milora-eval and milora-import's --base)."""

from __future__ import annotations

from pathlib import Path

from milora.errors import ConfigError, MiloraError, UnsupportedModelError
from milora.model.inject import KNOWN_ARCHITECTURES


def load_base_model(model_dir: str | Path, dtype: str = "float32", error: type[MiloraError] = ConfigError,
                    what: str = "the base model directory"):
    """The Hugging Face causal LM in model_dir as torch `dtype`, in eval mode. A directory that
    is missing, has no config.json or weights, holds an architecture milora does not support, or
    whose files cannot be loaded is `error` (UnsupportedModelError for the architecture) naming
    the directory, what was expected and the fix; never a transformers traceback."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise error(f"{what} {model_dir} does not exist; expected a Hugging Face model directory "
                    "(config.json + weights). Fix: check the path, or save the model with save_pretrained")
    if not (model_dir / "config.json").is_file():
        raise error(f"{model_dir} has no config.json; expected a Hugging Face model directory "
                    "(config.json + weights). Fix: save the model there with save_pretrained")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError, KeyError) as exc:
        raise error(f"{model_dir}/config.json cannot be read ({str(exc).splitlines()[0]}); expected a Hugging "
                    "Face config. Fix: save the model again with save_pretrained") from None

    archs = getattr(config, "architectures", None) or [type(config).__name__]
    if archs[0] not in KNOWN_ARCHITECTURES:
        raise UnsupportedModelError(f"{model_dir} holds a {archs[0]}; milora supports "
                                    f"{', '.join(KNOWN_ARCHITECTURES)}. Fix: use a model of one of those "
                                    "architectures (LLaMA layout)")
    weights = [p for p in model_dir.iterdir() if p.name.startswith(("model", "pytorch_model"))
               and p.name.endswith((".safetensors", ".bin", ".index.json"))]
    if not weights:
        raise error(f"{model_dir} has no weights file; expected model.safetensors (or sharded "
                    "model-*.safetensors with their index) next to config.json. Fix: save the model with "
                    "save_pretrained, or copy its weights there")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad weights file
        raise error(f"cannot load the model weights in {model_dir} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); the files are missing or corrupt. "
                    "Fix: copy or save the model again") from None
    return model.eval()
