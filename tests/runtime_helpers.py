"""An exported tiny model with a word-level tokenizer, for runtime tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export_helpers import make_model_dir

VOCAB = 96


def add_word_tokenizer(model_dir: Path) -> None:
    """tokenizer.json mapping 'w{i}' <-> id i, so text prompts work on tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok.save(str(model_dir / "tokenizer.json"))


def export_tiny(root: Path, hidden: int = 32, **options) -> tuple[Path, Path]:
    """(model_dir, out_dir) for the export_helpers tenants (alpha, beta, gamma, delta); hidden
    64 gives head dim 16, so the default flavour is fused (32: portable)."""
    from milora.export.exporter import export

    model_dir = make_model_dir(root, hidden=hidden)
    add_word_tokenizer(model_dir)
    out_dir = root / "out"
    export(model_dir, out_dir, progress=False, **options)
    return model_dir, out_dir


def random_prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, VOCAB, size=n)] for n in lengths]


def reference_greedy(model_dir: Path, tenant: str, prompt: list[int], max_new_tokens: int):
    """Greedy tokens of the PyTorch reference for one prompt alone, and the smallest top-2 logit
    margin seen along the way (a near-tie makes token equality a matter of rounding)."""
    import torch
    from transformers import AutoModelForCausalLM

    from milora.model.model import MiloraModel

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = MiloraModel.from_pretrained(base, model_dir / "adapters" / tenant).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(prompt):].tolist(), min(margins)
