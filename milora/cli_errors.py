"""The one home of command-line error handling: every milora command's main() is wrapped by
`cli_main(prog)` and builds its parser with `ArgumentParser` (docs/errors.md).

    MiloraError, and argparse usage errors   ->  "prog: error: <message>" on stderr, exit 2
    OSError (an output or input file)        ->  "prog: error: cannot access <path>: <reason>", exit 2
    KeyboardInterrupt (Ctrl-C, SIGINT)       ->  "prog: interrupted" on stderr, exit 130

Always one line and never a traceback. Torch-free (the runtime's milora-generate uses it).
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

from milora.errors import MiloraError, UsageError

EXIT_OK, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 2, 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line through cli_main) instead of printing the usage
    block and exiting. --help still prints and exits 0."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def one_line(message: object) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def describe_os_error(exc: OSError) -> str:
    path = exc.filename if exc.filename is not None else "?"
    also = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
    return (f"cannot access {path}{also}: {exc.strerror or exc}. Fix: check that the path exists, is writable "
            "where output goes, and that its file system has free space")


def report(prog: str, exc: BaseException) -> int:
    """Print the one line for exc and return the exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, OSError):
        print(f"{prog}: error: {one_line(describe_os_error(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    return EXIT_USER_ERROR


def cli_main(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Decorate a main(argv=None) -> int with milora's error handling (module docstring)."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapper(argv: list[str] | None = None) -> int:
            try:
                code = main(argv)
            except (MiloraError, OSError, KeyboardInterrupt) as exc:
                return report(prog, exc)
            return EXIT_OK if code is None else code

        return wrapper

    return wrap


def positive(name: str, value: int | float | None) -> None:
    """Refuse a numeric option < 1 (None: not given) with a UsageError naming the flag."""
    if value is not None and value < 1:
        raise UsageError(f"{name} {value} is out of range; expected a positive number (at least 1). "
                         f"Fix: pass {name} 1 or more, or omit it for the default")
