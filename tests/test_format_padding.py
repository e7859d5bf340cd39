"""milora.format.padding: the padding the graph flavours take (left for portable, right for fused)."""

from __future__ import annotations

import numpy as np
import pytest

from milora.format.padding import left_pad, pad_left_to, right_pad

PROMPTS = [[5, 6, 7], [8], [9, 10]]


def test_left_pad_ends_every_prompt_at_the_last_column():
    ids, mask = left_pad(PROMPTS, pad_id=0)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == (3, 3)
    for row, p in zip(range(3), PROMPTS):
        assert ids[row, -len(p):].tolist() == p and mask[row].sum() == len(p) and mask[row, -1] == 1
        assert (ids[row, :3 - len(p)] == 0).all()


def test_right_pad_starts_every_prompt_at_column_zero():
    ids, mask = right_pad(PROMPTS, pad_id=3, length=4)
    assert ids.shape == (3, 4)
    for row, p in zip(range(3), PROMPTS):
        assert ids[row, :len(p)].tolist() == p and (ids[row, len(p):] == 3).all()
        assert mask[row].tolist() == [1] * len(p) + [0] * (4 - len(p))


def test_pad_left_to_prepends_zeros_on_the_axis():
    kv = np.arange(12, dtype=np.float32).reshape(1, 2, 3, 2)  # [b, h, t, d]
    out = pad_left_to(kv, 5, axis=2)
    assert out.shape == (1, 2, 5, 2) and (out[:, :, :2] == 0).all() and (out[:, :, 2:] == kv).all()
    assert pad_left_to(kv, 3, axis=2) is kv
    with pytest.raises(ValueError):
        pad_left_to(kv, 2, axis=2)
