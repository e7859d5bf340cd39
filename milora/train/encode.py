"""Tokenising examples into training rows, and padding rows into batches.

Shape legend: B rows, T tokens (padded).

A row is prompt tokens followed by response tokens and EOS. Two masks come out of it, kept
separate as docs/method.md requires: the routing mask (the prompt span: routers pool only
these tokens) and the attention mask (prompt and response). Labels are -100 on the prompt
and on padding, so prompt tokens carry no loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from milora.errors import DataError
from milora.train.data import Example

IGNORE = -100


@dataclass
class Row:
    ids: list[int]
    prompt_len: int  # ids[:prompt_len] is the prompt


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt exactly as the model sees it at prefill: the chat template with the
    assistant header when `chat` (and the tokenizer has a template), else the raw text and a
    newline."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return tokenizer.encode(prompt + "\n", add_special_tokens=False)


def encode(tokenizer, ex: Example, max_length: int, chat: bool = True, response: str | None = None,
           eos: bool = True) -> Row:
    """Prompt + response (+ EOS). Too long: the prompt loses tokens from its start (the question
    sits at its end); DataError if even the response alone does not fit."""
    p = prompt_ids(tokenizer, ex.prompt, chat)
    r = tokenizer.encode(ex.response if response is None else response, add_special_tokens=False)
    if eos and tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    if len(r) >= max_length:
        raise DataError(f"example {ex.key!r}: its response has {len(r)} tokens, max_length is {max_length}; "
                        "raise --max-length")
    p = p[-(max_length - len(r)):]
    return Row(p + r, len(p))


def collate(rows: list[Row], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch: input_ids, attention_mask, routing_mask, labels, all [B, T]."""
    t = max(len(r.ids) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.long)
    routing = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        input_ids[i, :n] = torch.tensor(r.ids)
        attention[i, :n] = 1
        routing[i, : r.prompt_len] = 1
        labels[i, r.prompt_len:n] = input_ids[i, r.prompt_len:n]
    return {"input_ids": input_ids, "attention_mask": attention, "routing_mask": routing, "labels": labels}


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0
