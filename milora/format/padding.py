"""Padding a batch of prompts as the graphs require it (docs/export.md). Portable graphs take
left padding: every prompt ends at the last column, so the last position is where generation
starts. Fused graphs take right padding: every prompt starts at column 0 and the per-row
lengths say where it ends (their KV is written in place per row). The attention mask marks
the real tokens either way. One home for the runtimes, the validator, the TensorRT backend and
the PyTorch evaluation (which wraps the arrays with torch.from_numpy)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 [len(prompts), length or longest], prompts
    right-aligned."""
    t = max(len(p) for p in prompts) if length is None else length
    ids = np.full((len(prompts), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), t), dtype=np.int64)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, t - len(p):] = p
            mask[i, t - len(p):] = 1
    return ids, mask


def right_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 [len(prompts), length or longest], prompts
    left-aligned."""
    t = max(len(p) for p in prompts) if length is None else length
    ids = np.full((len(prompts), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), t), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
        mask[i, :len(p)] = 1
    return ids, mask


def pad_left_to(x: np.ndarray, length: int, axis: int = 1) -> np.ndarray:
    """x with zeros prepended along `axis` up to `length` (a mask or a KV cache joining a
    longer batch); x itself when it is that long already."""
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    if pad < 0:
        raise ValueError(f"cannot left-pad an axis of {x.shape[axis]} to {length}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, 0)
    return np.pad(x, widths)
