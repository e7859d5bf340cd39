"""Writing directories and files atomically: the one way milora writes its outputs (an
export's OUT_DIR, milora-quantize's QUANT_DIR, an imported adapter, the cached SmolLM2
directory and demo tenants, the demo's cached JSON).

staged_directory(final): the work happens in a temporary sibling `.NAME.partial-PID` that is
renamed over `final` when the work ends normally and removed on any failure or interrupt; one
left by a killed process is removed by the next writer to the same directory once that
process is gone. OSErrors become one typed line (WriteError) that says what could not be
written and how to fix it. atomic_write_text(path): the same for one file.
Torch-free (milora-quantize and the runtime's side run without torch).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from milora.errors import ExportError, WriteError


def check_out_dir(out_dir: Path, force: bool, what: str = "OUT_DIR", error=ExportError) -> None:
    """Refuse an output directory that exists and is not empty (unless force) or is a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"{what} {out_dir} exists and is not a directory; expected a new or empty directory. "
                    f"Fix: choose another {what}")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise error(f"{what} {out_dir} is not empty; expected a new or empty directory. Fix: choose another "
                    "directory or pass --force to replace it (only once the new one is complete)")


PARTIAL_MARK = ".partial-"


def partial_dir(out_dir: Path, pid: int) -> Path:
    """The temporary sibling an export by process `pid` writes into."""
    return out_dir.parent / f".{out_dir.name}{PARTIAL_MARK}{pid}"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) is not a probe on Windows: never remove another's directory
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OverflowError:  # not a PID at all
        return False
    return True


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Remove the .OUT.partial-PID directories of exports to out_dir whose process is gone (a
    killed export cannot clean up after itself); those of running exports are left alone."""
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    prefix = f".{out_dir.name}{PARTIAL_MARK}"
    for p in out_dir.parent.iterdir():
        pid = p.name[len(prefix):]
        if p.name.startswith(prefix) and pid.isascii() and pid.isdigit() and int(pid) != os.getpid() \
                and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


_WRITE_FIXES = {errno.ENOSPC: "free space on that file system or put {what} on another one",
                getattr(errno, "EDQUOT", -1): "free space within your quota or put {what} on another file system",
                errno.EACCES: "put {what} in a directory you can write to",
                errno.EPERM: "put {what} in a directory you can write to",
                errno.EROFS: "put {what} on a writable file system"}


def write_error(exc: OSError, out_dir: Path, tmp: Path, doing: str, what: str = "OUT_DIR") -> WriteError:
    """A typed, one-line account of an OSError met while writing out_dir (through tmp)."""
    where = Path(exc.filename) if exc.filename else tmp
    inside = where in out_dir.parents or any(where == d or d in where.parents for d in (tmp, out_dir))
    if not inside:  # an input that could not be read (the tmp directory was removed all the same)
        return WriteError(f"cannot read {where}: {exc.strerror or exc}; nothing was written to {what} {out_dir}. "
                          "Fix: check that the file exists and is readable")
    fix = _WRITE_FIXES.get(exc.errno, "check that the location is writable and has free space").format(what=what)
    removed = " (the partial directory was removed)" if where != tmp else ""
    return WriteError(f"cannot {doing} for {what} {out_dir}: {exc.strerror or exc} ({where}); nothing was written"
                      f"{removed}. Fix: {fix}")


@contextlib.contextmanager
def staged_directory(final: str | Path, what: str = "OUT_DIR", doing: str = "write it") -> Iterator[Path]:
    """A new directory to fill, renamed over `final` when the block ends normally (whatever
    `final` held is replaced: callers check first, e.g. with check_out_dir) and removed if it
    ends by an exception or an interrupt. OSErrors raised while filling or renaming it become
    WriteError naming `what` and `final` (an input that could not be read is reported as such)."""
    final = Path(final)
    remove_stale_partials(final)
    tmp = partial_dir(final, os.getpid())
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise write_error(exc, final, tmp, "create a temporary directory", what) from None
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(tmp, final)
    except OSError as exc:
        raise write_error(exc, final, tmp, doing, what) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary sibling and rename: a reader never sees half a file, and an
    interrupted write leaves the previous file (or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a shared cache unreadable to others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
