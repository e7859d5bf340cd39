"""A character-level tokenizer for the tiny test models (vocab 96, built in-process)."""

from __future__ import annotations

import string

CHARS = sorted(set(string.printable) - set("\x0b\x0c"))[: 96 - 3]


def char_tokenizer():
    """PreTrainedTokenizerFast: ids 0 pad, 1 bos, 2 eos, then one id per printable character.
    No chat template, so prompts are fed raw (encode.prompt_ids)."""
    from tokenizers import Tokenizer, models, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
