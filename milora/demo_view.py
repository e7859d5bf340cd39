"""What milora-demo prints, as pure functions of plain data (tested on synthetic inputs):
the routing grid, a tenant's answer beside the base model's, the score table.

No torch, no onnxruntime.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Sequence

from milora.format.contract import EXPERTS

# One letter per expert, in contract order: q k v o g(ate) u(p) d(own).
EXPERT_LETTERS = tuple(name[0] for name in EXPERTS)
ON, OFF = "#", "."


def routing_grid(gates: Sequence[Sequence[float]], indent: str = "  ") -> str:
    """A 7-row x L-column grid: row e, column l is ON when expert e is on in layer l
    (gate != 0: a selected expert's gate is never 0). gates: [L, 7]."""
    rows = [list(map(float, g)) for g in gates]
    if any(len(r) != len(EXPERTS) for r in rows):
        from milora.errors import RoutingError

        bad = sorted({len(r) for r in rows if len(r) != len(EXPERTS)})
        raise RoutingError(f"routing_grid needs gates of shape [layers, {len(EXPERTS)}]; got rows of length {bad}")
    n = len(rows)
    # Layer ruler: the index at every 10th column (0, 10, 20, ...), dots elsewhere avoided.
    ruler = [" "] * n
    for l in range(0, n, 10):
        for j, ch in enumerate(str(l)):
            if l + j < n:
                ruler[l + j] = ch
    lines = [f"{indent}  layer {''.join(ruler)}"]
    for e, letter in enumerate(EXPERT_LETTERS):
        lines.append(f"{indent}{letter:>7} {''.join(ON if rows[l][e] != 0 else OFF for l in range(n))}")
    return "\n".join(lines)


def experts_per_layer(gates: Sequence[Sequence[float]]) -> str:
    """'k=1' / 'k=2' / 'k=1..2': how many experts are on per layer."""
    counts = sorted({sum(1 for g in row if float(g) != 0) for row in gates})
    if not counts:
        return "no layers"
    return f"k={counts[0]}" if len(counts) == 1 else f"k={counts[0]}..{counts[-1]}"


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 100,
                 max_lines: int = 12) -> str:
    """Two texts in columns, each wrapped to half the width; each at most max_lines lines
    (the rest elided with '...'). Blank lines inside an answer are kept as one empty line."""
    col = max(16, (width - 3) // 2)

    def wrap(text: str) -> list[str]:
        out: list[str] = []
        for para in (text.strip() or "(empty answer)").splitlines():
            out += textwrap.wrap(para, col, break_long_words=True, replace_whitespace=False) or [""]
        if len(out) > max_lines:
            out = out[: max_lines - 1] + ["..."]
        return out

    a, b = wrap(left), wrap(right)
    a = [left_title[:col], "-" * min(col, max(len(left_title), 8))] + a
    b = [right_title[:col], "-" * min(col, max(len(right_title), 8))] + b
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return "\n".join(f"{x:<{col}} | {y}".rstrip() for x, y in zip(a, b))


@dataclass
class Score:
    """Accuracy of one system on n items, with its 95% bootstrap interval."""

    accuracy: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{100 * self.accuracy:5.1f}% [{100 * self.low:.0f}-{100 * self.high:.0f}]"


@dataclass
class ScoreRow:
    tenant: str
    task: str
    metric: str  # how items are scored, e.g. "option log-likelihood", "greedy answer, number match"
    tenant_score: Score
    base_score: Score
    diff: float  # tenant minus base accuracy, same items
    diff_low: float  # paired 95% bootstrap interval of diff
    diff_high: float
    same_items: bool = False  # tenant and base right on exactly the same items


def verdict(row: ScoreRow) -> str:
    """Plain words for the difference, never stronger than its interval allows."""
    if any(math.isnan(x) for x in (row.diff_low, row.diff_high)):
        return "not comparable"
    if row.same_items:
        return ("neither gets any item right" if row.tenant_score.accuracy == 0
                else "right on exactly the same items as the base model")
    if row.diff_low > 0:
        return "better than the base model"
    if row.diff_high < 0:
        return "worse than the base model"
    return "no clear difference from the base model"


def score_table(rows: Sequence[ScoreRow]) -> str:
    head = f"  {'tenant':<14}{'task':<14}{'n':>4}  {'tenant':<18}{'base model':<18}{'tenant - base':<22}verdict"
    lines = [head]
    for r in rows:
        diff = f"{100 * r.diff:+.1f} [{100 * r.diff_low:+.0f}, {100 * r.diff_high:+.0f}]"
        lines.append(f"  {r.tenant:<14}{r.task:<14}{r.tenant_score.n:>4}  {str(r.tenant_score):<18}"
                     f"{str(r.base_score):<18}{diff:<22}{verdict(r)}")
    return "\n".join(lines)


def score_summary(rows: Sequence[ScoreRow]) -> str:
    """One sentence that says what the table shows, in the weakest form the data allows."""
    better = [r.tenant for r in rows if verdict(r) == "better than the base model"]
    worse = [r.tenant for r in rows if verdict(r) == "worse than the base model"]
    if not rows:
        return "No scores."
    if len(better) == len(rows):
        return "Every tenant beats the base model on its task (the 95% interval of the difference is above 0)."
    parts = []
    if better:
        parts.append(f"{', '.join(better)} beat{'s' if len(better) == 1 else ''} the base model on its task")
    if worse:
        parts.append(f"{', '.join(worse)} {'is' if len(worse) == 1 else 'are'} worse than the base model")
    rest = [r.tenant for r in rows if r.tenant not in better + worse]
    if rest:
        parts.append(f"{', '.join(rest)} show{'s' if len(rest) == 1 else ''} no difference from the base model "
                     "that these few items can establish")
    return "; ".join(parts) + "."
