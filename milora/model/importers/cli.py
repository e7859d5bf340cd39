"""milora-import: convert a PEFT LoRA adapter or a reference-code checkpoint into a MiLoRA
adapter directory (format v1). A thin layer over convert_to_milora.

    milora-import SRC_DIR OUT_DIR --base HF_MODEL_DIR [--top-k K] [--alpha A]

Only the base model's config.json is read (for its dimensions); no weights are loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from milora.cli_errors import ArgumentParser, cli_main
from milora.errors import AdapterImportError, UsageError


def base_dims_from_dir(model_dir: str | Path) -> dict[str, Any]:
    """Base dims (adapter_format.BASE_KEYS) from a Hugging Face model directory's config."""
    from transformers import AutoConfig

    from milora.model.inject import base_info

    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AdapterImportError(f"--base {model_dir}: cannot read a Hugging Face config.json ({exc})") from None
    if not getattr(config, "architectures", None):
        raise AdapterImportError(f"--base {model_dir}: config.json has no 'architectures'; expected e.g. "
                           "['LlamaForCausalLM'] (save the model with save_pretrained)")
    return base_info(SimpleNamespace(config=config))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="milora-import", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="PEFT adapter dir (adapter_config.json) or reference checkpoint dir "
                               "(lora_modules.bin + lora_gatings.bin)")
    p.add_argument("out", help="new directory for the MiLoRA adapter")
    p.add_argument("--base", required=True, help="the base model's Hugging Face directory")
    p.add_argument("--top-k", type=int, default=None, help="reference checkpoints: experts per layer "
                                                           "(default: the recorded k, else 1)")
    p.add_argument("--alpha", type=float, default=None, help="reference checkpoints without a recorded lora_alpha")
    return p.parse_args(argv)


@cli_main("milora-import")
def main(argv: list[str] | None = None) -> int:
    from milora.model.importers import convert_to_milora

    args = parse_args(argv)
    if args.top_k is not None and not 1 <= args.top_k <= 7:
        raise UsageError(f"--top-k {args.top_k} is out of range; expected 1..7 (experts switched on per layer). "
                         "Fix: pass --top-k between 1 and 7, or omit it for the checkpoint's recorded k")
    if args.alpha is not None and not args.alpha > 0:
        raise UsageError(f"--alpha {args.alpha} is out of range; expected a positive number (the LoRA alpha). "
                         "Fix: pass the lora_alpha used in training (the reference code's default is 32)")
    out = convert_to_milora(args.src, args.out, base_dims_from_dir(args.base), top_k=args.top_k, alpha=args.alpha)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
