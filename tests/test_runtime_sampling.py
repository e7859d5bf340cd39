"""Sampling: greedy, temperature/top-k/top-p filters, repetition penalty, seeds, stop strings."""

import numpy as np
import pytest

from milora.runtime.sampling import Sampler, SamplingError, SamplingParams, find_stop


def test_greedy_takes_argmax_first_on_ties():
    s = Sampler(SamplingParams())
    assert s(np.array([0.0, 3.0, 3.0, 1.0])) == 1


def test_repetition_penalty_changes_greedy_choice():
    logits = np.array([2.0, 1.9, -1.0])
    seen = np.array([True, False, False])
    assert Sampler(SamplingParams())(logits, seen) == 0
    # 2.0 / 1.2 = 1.67 < 1.9: the repeated token loses.
    assert Sampler(SamplingParams(repetition_penalty=1.2))(logits, seen) == 1


def test_top_k_and_top_p_restrict_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    empty = None
    draws_k = {Sampler(SamplingParams(temperature=1.0, top_k=2, seed=i))(logits, empty) for i in range(200)}
    assert draws_k == {0, 1}
    # top_p=0.7: 0.5 < 0.7 <= 0.8, so tokens 0 and 1 are kept.
    draws_p = {Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=i))(logits, empty) for i in range(200)}
    assert draws_p == {0, 1}


def test_seeded_sampling_is_reproducible_and_follows_probabilities():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    empty = None
    a, b = Sampler(SamplingParams(temperature=1.0, seed=7)), Sampler(SamplingParams(temperature=1.0, seed=7))
    seq_a = [a(logits, empty) for _ in range(50)]
    assert seq_a == [b(logits, empty) for _ in range(50)]
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    freq = np.bincount([s(logits, empty) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=0),
                                 dict(repetition_penalty=0), dict(stop=("",))])
def test_invalid_params_are_refused(bad):
    with pytest.raises(SamplingError):
        SamplingParams(**bad)


def test_find_stop_across_token_boundaries():
    assert find_stop("hello wor", ("world",), 6) is None
    # New text starts at 9; "world" straddles the boundary and is found, "o w" lay wholly
    # in text already checked at an earlier step.
    assert find_stop("hello world!", ("world", "o w"), 9) == 6
    assert find_stop("hello world!", ("world", "o w"), 5) == 4
