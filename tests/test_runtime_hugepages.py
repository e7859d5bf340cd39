"""milora.runtime.hugepages: the onnxruntime backend moves the memory its sessions allocated
while loading into 2 MB pages, and only that memory, and only where it is resident."""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np
import pytest

from milora.format import manifest as mf
from milora.runtime import hugepages
from milora.runtime.ort_backend import OrtBackend

MB = 1 << 20

SMAPS = """\
55d0c0000000-55d0c0400000 rw-p 00000000 00:00 0                          [heap]
Size:               4096 kB
Rss:                3072 kB
AnonHugePages:      2048 kB
7f0000000000-7f0002000000 rw-p 00000000 00:00 0 
Size:              32768 kB
Rss:               32768 kB
AnonHugePages:         0 kB
7f0010000000-7f0010100000 rw-p 00010000 08:01 123456                     /usr/lib/libfoo.so
Size:               1024 kB
Rss:                1024 kB
AnonHugePages:         0 kB
7f0020000000-7f0020100000 r-xp 00000000 00:00 0 
Rss:                1024 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                 132 kB
7f0030000000-7f0030200000 rw-s 00000000 00:01 77                         /dev/zero (deleted)
Rss:                2048 kB
"""


def test_mappings_are_the_private_writable_anonymous_ones_with_their_resident_bytes(tmp_path):
    path = tmp_path / "smaps"
    path.write_text(SMAPS)
    assert hugepages._anonymous_mappings(str(path)) == [
        (0x55D0C0000000, 0x55D0C0400000, 3072 * 1024, 2048 * 1024),
        (0x7F0000000000, 0x7F0002000000, 32 * MB, 0),
    ]


@pytest.mark.parametrize("start,end,expect", [
    (0, 4 * MB, (0, 4 * MB)),
    (4096, 4 * MB + 4096, (2 * MB, 4 * MB)),
    (4096, 2 * MB + 4096, (2 * MB, 2 * MB)),  # no whole 2 MB page inside
])
def test_the_interior_is_the_whole_2mb_pages_inside(start, end, expect):
    lo, hi = hugepages._interior(start, end)
    assert (lo, hi) == expect and lo % hugepages.HUGE_PAGE == 0 and hi % hugepages.HUGE_PAGE == 0


def test_nothing_happens_where_huge_pages_are_off(monkeypatch):
    monkeypatch.setattr(hugepages, "setting", lambda: "never")
    report = hugepages.collapse(since={})
    assert report.mappings == 0 and report.collapsed_bytes == 0
    assert report.skipped and "off" in report.skipped[0]


class Region:
    """A private anonymous mapping between two PROT_NONE guard pages, so the kernel cannot
    merge it with a neighbouring mapping: it is one line of /proc/self/smaps of its own."""

    def __init__(self, nbytes: int):
        page = mmap.PAGESIZE
        self.map = mmap.mmap(-1, nbytes + 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for guard in (base, base + page + nbytes):
            assert libc.mprotect(ctypes.c_void_p(guard), page, 0) == 0
        self.start, self.end = base + page, base + page + nbytes
        self.array = np.frombuffer(self.map, np.uint8, nbytes, offset=page)

    def mapping(self):
        """(start, end, rss, huge) of this region in /proc/self/smaps (summed over its lines:
        advising a part of a mapping splits it)."""
        lines = [m for m in hugepages._anonymous_mappings() if self.start <= m[0] < self.end]
        assert lines and lines[0][0] == self.start and lines[-1][1] == self.end
        return self.start, self.end, sum(m[2] for m in lines), sum(m[3] for m in lines)


needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or hugepages.setting() in (None, "never"),
                               reason="needs Linux with transparent huge pages not set to 'never'")


@needs_thp
def test_collapse_moves_new_resident_memory_into_huge_pages_and_keeps_every_byte():
    before = hugepages.snapshot()
    region = Region(32 * MB)
    values = np.random.default_rng(0).integers(0, 256, region.array.size, dtype=np.uint8)
    region.array[:] = values
    report = hugepages.collapse(since=before)
    if any("MADV_COLLAPSE" in s for s in report.skipped):
        pytest.skip(report.skipped[0])
    start, end, rss, huge = region.mapping()
    lo, hi = hugepages._interior(start, end)
    assert huge >= hi - lo >= 28 * MB  # every whole 2 MB page of it
    assert report.mappings >= 1 and report.collapsed_bytes >= huge - 2 * MB
    assert np.array_equal(region.array, values)


@needs_thp
def test_collapse_leaves_memory_that_was_there_before_and_memory_that_is_not_resident():
    old = Region(16 * MB)
    old.array[:] = 1
    old_huge = old.mapping()[3]
    before = hugepages.snapshot()
    sparse = Region(64 * MB)
    sparse.array[::8 * MB] = 1  # 8 pages of 16384 touched
    report = hugepages.collapse(since=before)
    assert old.mapping()[3] == old_huge
    # Collapsing it would have made all 64 MB resident; at most the touched pages (2 MB each
    # where the setting is 'always') are.
    assert sparse.mapping()[2] <= 8 * hugepages.HUGE_PAGE
    assert report.huge_after - report.huge_before <= 8 * hugepages.HUGE_PAGE


def test_the_backend_collapses_on_cpu_unless_told_not_to(tiny_export):
    _, out = tiny_export
    manifest = mf.read_manifest(out)
    on, off = OrtBackend(out, manifest), OrtBackend(out, manifest, huge_pages=False)
    assert off.huge_pages is None
    assert isinstance(on.huge_pages, hugepages.HugePageReport)
    assert set(on.huge_pages.as_dict()) == {"setting", "mappings", "collapsed_mb", "seconds", "skipped"}


def test_the_command_lines_pass_no_huge_pages_to_the_engine(monkeypatch):
    from milora.runtime import cli as generate
    from milora.serve.cli import build_parser as serve_parser, engine_options

    seen = []
    monkeypatch.setattr(generate, "Engine", lambda *a, **kw: seen.append(kw["huge_pages"]))
    for argv, expect in ((["out", "--list-tenants", "--no-huge-pages"], False), (["out", "--list-tenants"], True)):
        generate._engine(generate.build_parser().parse_args(argv))
        assert seen.pop() is expect
        assert engine_options(serve_parser().parse_args(argv[:1] + argv[2:]))["huge_pages"] is expect
