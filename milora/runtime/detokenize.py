"""Incremental detokenization: the text of a growing list of token ids, decoding a short
window per new token instead of the whole output at every step.

    window   = ids[prefix:]                    (prefix: where the last emitted piece began)
    seen     = decode(ids[prefix:read])        (read: how far text has been emitted)
    new      = decode(window)
    delta    = new[len(seen):]   once new is longer than seen and does not end in U+FFFD

A byte-level BPE token may carry part of a UTF-8 character; its window decodes to U+FFFD
until the rest arrives, so nothing is emitted until the character is whole. Windows start
where an earlier window ended on a whole character, so the concatenated deltas equal
decode(ids) (tested against full decoding). finish() emits whatever is held back, invalid
bytes included, exactly as a full decode would show them.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._tok = tokenizer  # tokenizers.Tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token: int) -> str:
        """Append one token id; returns the text it completes (possibly empty)."""
        self.ids.append(token)
        seen = self._decode(self.ids[self._prefix:self._read])
        new = self._decode(self.ids[self._prefix:])
        if len(new) <= len(seen) or new.endswith(REPLACEMENT):
            return ""
        delta = new[len(seen):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """Emit text held back for an unfinished character (as decode(ids) shows it)."""
        if self._read == len(self.ids):
            return ""
        seen = self._decode(self.ids[self._prefix:self._read])
        delta = self._decode(self.ids[self._prefix:])[len(seen):]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta
