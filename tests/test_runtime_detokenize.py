"""Incremental detokenization equals decoding the whole output, for a byte-level BPE whose
tokens split UTF-8 characters (trained here, in-process) and for a word-level tokenizer;
min_new_tokens and the incremental repetition-penalty history through the engine."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milora.runtime import Engine, SamplingParams
from milora.runtime.detokenize import IncrementalDetokenizer

CORPUS = ["Grüße aus Zürich: ½ Käse, 3 × Brot — und 🍕🍕 für alle!", "naïve café résumé déjà vu", "日本語のテキストです。",
          "def f(x):\n    return x ** 2  # ok", "The answer is 42.\n\nThe answer is 43."] * 20


@pytest.fixture(scope="module")
def byte_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _incremental(tok, ids):
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(i) for i in ids] + [d.finish()]
    return d.text, pieces


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data())
def test_byte_level_incremental_equals_full_decode(byte_bpe, data):
    """Random id sequences, whole characters and split ones (byte tokens of one character
    may arrive in any order, and a sequence may end mid-character)."""
    ids = data.draw(st.lists(st.integers(0, byte_bpe.get_vocab_size() - 1), max_size=40))
    text, pieces = _incremental(byte_bpe, ids)
    assert text == byte_bpe.decode(ids) and "".join(pieces) == text


def test_real_text_streams_whole_characters(byte_bpe):
    sample = " ".join(CORPUS[:5]) + " Ωμέγα ∑ 🚀"  # characters the BPE never merged: one byte per token
    ids = byte_bpe.encode(sample).ids
    text, pieces = _incremental(byte_bpe, ids)
    assert text == byte_bpe.decode(ids) == sample
    assert all("\ufffd" not in p for p in pieces)  # never a half character on the wire
    assert any(p == "" for p in pieces[:-1]), "some tokens carry part of a character (the case under test)"


def test_word_level_incremental_equals_full_decode():
    from runtime_helpers import add_word_tokenizer

    import tempfile
    from pathlib import Path
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as d:
        add_word_tokenizer(Path(d))
        tok = Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
    ids = np.random.default_rng(0).integers(0, 96, 50).tolist()
    assert _incremental(tok, ids)[0] == tok.decode(ids)


@pytest.fixture(scope="module")
def out_dir(tiny_export):
    return tiny_export[1]


def test_engine_text_is_the_decoded_output(out_dir):
    with Engine(out_dir) as engine:
        req = engine.generate("alpha", prompt_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=12, ignore_eos=True))
        assert req.text == engine.bundle.decode(req.output_ids)


def test_min_new_tokens_holds_off_eos(out_dir):
    """A stop token that greedy decoding would pick at once cannot end the request before
    min_new_tokens; without min_new_tokens it ends it immediately."""
    with Engine(out_dir) as engine:
        first = engine.generate("beta", prompt_ids=[9, 8, 7], params=SamplingParams(max_new_tokens=1, ignore_eos=True))
        stop = first.output_ids[0]
        early = engine.generate("beta", prompt_ids=[9, 8, 7], params=SamplingParams(max_new_tokens=6, stop_token_ids=[stop]))
        held = engine.generate("beta", prompt_ids=[9, 8, 7],
                               params=SamplingParams(max_new_tokens=6, min_new_tokens=4, stop_token_ids=[stop]))
    assert early.output_ids == [] and early.finish_reason == "stop"
    assert len(held.output_ids) >= 4 and stop not in held.output_ids[:4]


def test_repetition_penalty_history_covers_prompt_and_output(out_dir):
    """With a huge penalty, greedy never repeats a prompt or earlier output token."""
    prompt = [5, 6, 7, 8]
    with Engine(out_dir) as engine:
        req = engine.generate("gamma", prompt_ids=prompt,
                              params=SamplingParams(max_new_tokens=20, ignore_eos=True, repetition_penalty=1e6))
    out = req.output_ids
    assert len(set(out)) == len(out) and not set(out) & set(prompt)
