"""Transparent huge pages for the weights a CPU decode step streams through.

A decode step on a CPU reads every weight once (SmolLM2-135M: 538 MB per step). With 4 KB
pages that takes one TLB entry per 4 KB, and the page walks show in the step time. Linux backs
memory with 2 MB pages when a mapping asks for it (madvise(MADV_HUGEPAGE)) under the common
`madvise` setting of /sys/kernel/mm/transparent_hugepage/enabled, but onnxruntime does not ask.

So the onnxruntime backend takes a snapshot() of the process's anonymous memory before it opens
its sessions and, once they are open, collapse(since=snapshot) moves what the sessions added
(onnxruntime's packed weights, written while loading) into 2 MB pages with MADV_COLLAPSE
(Linux 6.1+), and marks it MADV_HUGEPAGE so it stays so. Only mappings that appeared or grew
while loading are touched, and only those (almost) fully resident, so no untouched memory
becomes resident and the rest of the process is left alone. Where the kernel lacks
MADV_COLLAPSE, the setting is `never`, or this is not Linux, nothing happens and the report
says why. Measured with benchmarks/peers.py (the milora-base-4k and milora-k1-r16-4k systems
turn it off; BENCHMARKS.md): SmolLM2-135M fp32 on a 2-core x86 machine decodes 1-17% faster
at B=1 and 6-10% faster at B=8 (two runs of 4 and 5 rounds), for about 1.4 s more at load
(545 MB collapsed); for 8 tenants at B=8 the one paired run measured 0.97x, within that
machine's round-to-round noise.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass, field

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
MIN_FILL = 0.9  # a mapping is collapsed only if at least this share of it is resident
SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
SMAPS = "/proc/self/smaps"


@dataclass
class HugePageReport:
    """What collapse() did: the mappings it collapsed, the process's anonymous memory in 2 MB
    pages before and after, how long it took, and why it did less than asked."""

    setting: str | None
    mappings: int = 0
    huge_before: int = 0
    huge_after: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    @property
    def collapsed_bytes(self) -> int:
        return max(0, self.huge_after - self.huge_before)

    def as_dict(self) -> dict:
        return {"setting": self.setting, "mappings": self.mappings, "collapsed_mb": round(self.collapsed_bytes / 2**20, 1),
                "seconds": round(self.seconds, 3), "skipped": list(self.skipped)}


def setting() -> str | None:
    """The system's THP setting (always | madvise | never), None where there is none."""
    try:
        with open(SETTING) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def _madvise(libc, start: int, length: int, advice: int) -> int:
    """0, or the errno madvise set."""
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0:
        return 0
    return ctypes.get_errno()


def _interior(start: int, end: int) -> tuple[int, int]:
    """The 2 MB-aligned part of [start, end) (empty when there is none)."""
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = end // HUGE_PAGE * HUGE_PAGE
    return lo, max(lo, hi)


def _anonymous_mappings(smaps: str = SMAPS):
    """(start, end, rss_bytes, huge_bytes) of each private writable anonymous mapping."""
    out, current = [], None
    with open(smaps) as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                if current is not None:
                    out.append(current)
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                path = head[5].strip() if len(head) > 5 else ""
                anon = head[1] == "rw-p" and head[4] == "0" and path in ("", "[heap]")
                current = [lo, hi, 0, 0] if anon else None
            elif current is not None and head[0] in ("Rss:", "AnonHugePages:"):
                current[2 if head[0] == "Rss:" else 3] = int(head[1]) * 1024
    if current is not None:
        out.append(current)
    return [tuple(m) for m in out]


def snapshot(smaps: str = SMAPS) -> dict[int, int]:
    """{start address: resident bytes} of the process's anonymous mappings now (empty where
    /proc is not readable): pass it to collapse(since=...) to collapse only what came after."""
    try:
        return {lo: rss for lo, _, rss, _ in _anonymous_mappings(smaps)}
    except OSError:
        return {}


def collapse(since: dict[int, int] | None = None, min_bytes: int = 4 * HUGE_PAGE, min_fill: float = MIN_FILL,
             smaps: str = SMAPS) -> HugePageReport:
    """Move resident anonymous memory into 2 MB pages now: the mappings that appeared, or grew
    by min_bytes, since the snapshot `since` (all of them when it is None), that are at least
    min_bytes long and min_fill resident. Best effort: never raises for what the kernel declines."""
    report = HugePageReport(setting())
    libc = _libc()
    if libc is None:
        report.skipped.append("not Linux: no transparent huge pages")
        return report
    if report.setting in (None, "never"):
        report.skipped.append(f"transparent huge pages are off ({SETTING}: {report.setting})")
        return report
    t0 = time.perf_counter()
    try:
        mappings = _anonymous_mappings(smaps)
    except OSError as exc:
        report.skipped.append(f"{smaps} is not readable ({exc})")
        return report
    report.huge_before = report.huge_after = sum(m[3] for m in mappings)
    for lo, hi, rss, huge in mappings:
        size = hi - lo
        if since is not None and rss - since.get(lo, 0) < min_bytes:
            continue  # there before, and not grown: not ours to change
        if size < min_bytes or rss < min_fill * size or huge >= rss - HUGE_PAGE:
            continue
        a, b = _interior(lo, hi)
        if b <= a:
            continue
        _madvise(libc, a, b - a, MADV_HUGEPAGE)
        err = _madvise(libc, a, b - a, MADV_COLLAPSE)
        if err == 22:  # EINVAL: a kernel before 6.1 has no MADV_COLLAPSE; khugepaged may still do it later
            report.skipped.append("this kernel has no MADV_COLLAPSE (Linux 6.1+); the memory was only advised")
            break
        report.mappings += 1
        if err not in (0, 11, 12):  # EAGAIN / ENOMEM: some pages could not be moved; the rest were
            report.skipped.append(f"madvise(MADV_COLLAPSE) failed on a {size >> 20} MB mapping: {os.strerror(err)}")
    if report.mappings:
        try:
            report.huge_after = sum(m[3] for m in _anonymous_mappings(smaps))
        except OSError:
            pass
    report.seconds = time.perf_counter() - t0
    return report
