"""Progress output that suits where it goes: a tqdm bar when stderr is a terminal, and in a
log or CI (stderr redirected) plain lines instead, one every `every` steps and one at the
end, never carriage returns.

    with progress(total=40, desc="milora-train", unit="step") as bar:
        for ...:
            bar.update(1, loss=f"{loss:.3f}")   # postfix shown on the bar / on the plain line
            bar.write("step 10: dev loss 1.23")  # a message that does not break the bar

No torch: the runtime and the demo's parent process use it too.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

# MILORA_PROGRESS=bar|plain|off overrides the terminal test (plain: lines even on a terminal).
ENV = "MILORA_PROGRESS"
MODES = ("bar", "plain", "off")
# Plain mode: about this many lines per loop, however long it is.
PLAIN_LINES = 10


def mode(stream: TextIO | None = None) -> str:
    """'bar' when `stream` (default stderr) is a terminal, else 'plain'; MILORA_PROGRESS
    overrides. An unknown MILORA_PROGRESS value falls back to the terminal test."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in MODES:
        return forced
    stream = stream or sys.stderr
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # a closed or exotic stream
        return "plain"


def interactive(stream: TextIO | None = None) -> bool:
    return mode(stream) == "bar"


class Progress:
    """One loop's progress. enabled=False: silent (the caller's progress flag)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 every: int | None = None, stream: TextIO | None = None, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.n = initial
        self.kind = mode(self.stream) if enabled else "off"
        self.every = every or max(1, (total or 0) // PLAIN_LINES or 1)
        self.started = time.perf_counter()
        self._postfix = ""
        self._bar = None
        if self.kind == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=False)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if postfix:
            self.set_postfix(**postfix)
        if self._bar is not None:
            self._bar.update(n)
        elif self.kind == "plain" and (self.n % self.every == 0 or self.n == self.total):
            self._line()

    def set_postfix(self, **postfix: Any) -> None:
        self._postfix = ", ".join(f"{k} {v}" for k, v in postfix.items())
        if self._bar is not None:
            self._bar.set_postfix(**postfix)

    def set_description(self, text: str) -> None:
        """The current sub-step (bar: shown as postfix; plain: printed as a line of its own)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        elif self.kind == "plain":
            self.write(f"{self.desc}: {text}")

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        elif self.kind == "plain":
            print(message, file=self.stream, flush=True)

    def _line(self) -> None:
        of = f"/{self.total}" if self.total else ""
        extra = f", {self._postfix}" if self._postfix else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}{extra} ({time.perf_counter() - self.started:.0f} s)",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True, every: int | None = None,
             initial: int = 0) -> Progress:
    return Progress(total, desc, unit, enabled, every, initial=initial)
