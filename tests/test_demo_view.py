"""milora-demo's printed views on synthetic data: routing grid, answers side by side, scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from milora.demo_view import (Score, ScoreRow, experts_per_layer, routing_grid, score_summary, score_table,
                              side_by_side, verdict)
from milora.errors import RoutingError


def test_routing_grid_marks_exactly_the_experts_on():
    gates = np.zeros((30, 7), dtype=np.float32)
    gates[0, 0] = 0.9  # layer 0: q
    gates[12, 4] = 0.6  # layer 12: gate
    gates[12, 6] = 1e-38  # a tiny selected gate is still on
    gates[29, 3] = 1.0  # layer 29: o
    lines = routing_grid(gates, indent="").splitlines()
    assert len(lines) == 8  # ruler + one row per expert
    assert lines[0].split("layer ")[1].startswith("0         10        20")
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert list(rows) == ["q", "k", "v", "o", "g", "u", "d"]
    assert all(len(r) == 30 for r in rows.values())
    on = {(e, l) for e, r in rows.items() for l, ch in enumerate(r) if ch == "#"}
    assert on == {("q", 0), ("g", 12), ("d", 12), ("o", 29)}
    assert experts_per_layer(gates) == "k=0..2"
    assert experts_per_layer(np.eye(7)[[0, 1, 2] * 10]) == "k=1"


def test_routing_grid_refuses_a_wrong_shape():
    with pytest.raises(RoutingError, match=r"\[layers, 7\].*\[5\]"):
        routing_grid(np.zeros((30, 5)))


def test_side_by_side_wraps_both_columns_and_elides_long_answers():
    left = "yes"
    right = " ".join(f"word{i}" for i in range(200))
    text = side_by_side("tenant boolq", left, "base model", right, width=60, max_lines=6)
    lines = text.splitlines()
    col = (60 - 3) // 2
    assert lines[0].startswith("tenant boolq") and "| base model" in lines[0]
    assert lines[2].startswith("yes") and lines[2][col:col + 3] == " | "
    assert len(lines) == 2 + 6  # titles, rules, max_lines of the longer column
    assert lines[-1].endswith("...")
    assert all(len(line) <= 60 for line in lines)
    assert "(empty answer)" in side_by_side("a", "", "b", "x", width=40)


def _row(tenant, a, b, lo, hi, n=40):
    return ScoreRow(tenant, "task", "option log-likelihood", Score(a, a - 0.1, a + 0.1, n), Score(b, b - 0.1, b + 0.1, n),
                    a - b, lo, hi)


def test_verdicts_never_claim_more_than_the_interval():
    assert verdict(_row("t", 0.7, 0.5, 0.05, 0.35)) == "better than the base model"
    assert verdict(_row("t", 0.6, 0.5, -0.05, 0.25)) == "no clear difference from the base model"
    assert verdict(_row("t", 0.3, 0.5, -0.35, -0.05)) == "worse than the base model"
    assert verdict(_row("t", 0.3, 0.5, math.nan, math.nan)) == "not comparable"


def test_score_table_and_summary():
    rows = [_row("arc-easy", 0.55, 0.5, -0.1, 0.2), _row("boolq", 0.75, 0.5, 0.1, 0.4, n=60)]
    table = score_table(rows).splitlines()
    assert table[0].split()[:3] == ["tenant", "task", "n"]
    assert "arc-easy" in table[1] and " 40 " in table[1] and "55.0% [45-65]" in table[1]
    assert "+5.0 [-10, +20]" in table[1] and "no clear difference" in table[1]
    assert "boolq" in table[2] and " 60 " in table[2] and "better than the base model" in table[2]
    summary = score_summary(rows)
    assert "boolq beats the base model" in summary and "arc-easy shows no difference" in summary
    assert "Every tenant" not in summary
    assert score_summary([rows[1]]).startswith("Every tenant beats")


def test_identical_results_are_called_identical():
    same = ScoreRow("t", "task", "m", Score(0.7, 0.5, 0.9, 20), Score(0.7, 0.5, 0.9, 20), 0.0, 0.0, 0.0, same_items=True)
    assert verdict(same) == "right on exactly the same items as the base model"
    none = ScoreRow("t", "task", "m", Score(0.0, 0.0, 0.0, 10), Score(0.0, 0.0, 0.0, 10), 0.0, 0.0, 0.0, same_items=True)
    assert verdict(none) == "neither gets any item right"


def test_served_pairs_print_grid_answers_and_rates(capsys):
    from types import SimpleNamespace

    from milora import demo
    from milora.train.data import Example

    gates = np.zeros((30, 7), dtype=np.float32)
    gates[:, 4] = 1.0  # every layer: the MLP gate projection

    def req(text, tokens, gates=None, status="finished", first=1.0):
        return SimpleNamespace(text=text, output_ids=list(range(tokens)), gates=gates, status=status, error=None,
                               submitted_at=0.0, first_token_at=first, finished_at=None if first is None else 3.0)

    ex = Example("Is the sky blue?\nAnswer yes or no.", "yes", ["no", "yes"], 1)
    served = {"pairs": [("boolq", ex, req("yes", 1, gates), req("Yes, the sky is blue because ...", 21)),
                        ("boolq", ex, req("", 0, None, "failed", None), req("No.", 3))], "seconds": 4.0}
    demo.print_served(served, width=80)
    out = capsys.readouterr().out
    assert "=== tenant boolq (k=1 experts on per layer)" in out and "expected answer: yes" in out
    assert "        g " + "#" * 30 in out and "        q " + "." * 30 in out
    assert "yes" in out and "| Yes, the sky is blue because ..." in out
    assert "base:   21 tokens, first after 1.00 s, then 10.0 tok/s" in out
    assert "no token (failed)" in out and "(the request failed before its prefill)" in out
    assert "4 requests (2 questions x tenant and base model) in one batch: 25 tokens in 4.0 s" in out
