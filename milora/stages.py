"""Running a heavy stage (materialise, train, export) in a child process, and cache files
written atomically.

A stage in a child process gives its memory back to the system when it ends: the demo's
peak is the largest stage's, not the sum of every stage's (PyTorch and the allocator keep
what a stage freed inside the process). The child is started with 'spawn' (a fresh
interpreter: nothing of the parent's heap is copied) and reports its own peak RSS.

No torch here: the parent process of the demo stays light.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from milora.errors import MiloraError
from milora.format.outdir import atomic_write_text


class StageError(MiloraError):
    """A demo stage's child process died without an error of its own (killed, out of memory)."""


@dataclass
class StageResult:
    value: Any
    peak_rss: int  # bytes, the stage's process alone (0 when not measured)
    cpu_seconds: float = 0.0  # user + system time of the stage's process (0 when not measured)


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (0 where unknown)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (0 where unknown). Unlike wall time it
    hardly depends on what else the machine runs: the demo reports both."""
    try:
        import resource
    except ImportError:
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(fn: Callable[..., Any], args: tuple, kwargs: dict) -> StageResult:
    value = fn(*args, **kwargs)
    return StageResult(value, peak_rss(), cpu_seconds())


def run_isolated(label: str, fn: Callable[..., Any], *args: Any, isolate: bool = True, **kwargs: Any) -> StageResult:
    """fn(*args, **kwargs) in a fresh child process (isolate=True) or here. fn and its
    arguments must be picklable (a module-level function); its exceptions are re-raised
    here as they were raised there (a MiloraError keeps its type and message)."""
    if not isolate:
        return StageResult(fn(*args, **kwargs), 0)
    import multiprocessing

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_child, fn, args, kwargs).result()
        except BrokenProcessPool:
            raise StageError(f"the {label} stage's process ended abruptly (killed, or out of memory: the "
                             "largest stage needs about 3.5 GB free); nothing of it was cached. Free some memory and run again") from None


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_cached_json(path: str | Path) -> Any | None:
    """The JSON in path, or None when it is missing or unreadable (a cache miss, not an error)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
