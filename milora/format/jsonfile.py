"""Reading the JSON files milora writes or takes as input (manifest.json, milora_config.json,
the tokenizer's JSON files, PEFT's adapter_config.json, engines.json, --config files): one
reader, so that every unreadable, malformed or mistyped file is the same typed one-line error
naming the file, what was wrong and the fix, never a JSONDecodeError, UnicodeDecodeError or
RecursionError from deep inside.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from milora.errors import MiloraError


def read_json(path: str | Path, error: type[MiloraError], fix: str, what: str = "this file",
              require_object: bool = True) -> Any:
    """The JSON document in `path`. `error` is raised (naming the path, the problem and `fix`, a
    sentence such as "export again") when the file cannot be read, is not UTF-8 JSON, is nested
    too deeply to parse, or (require_object) is not a JSON object. A missing file is the caller's
    to report: it raises error too, but callers with a better message check first."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc}); expected {what}. Fix: {fix}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({str(exc)[:200]}); the file is corrupt. Fix: {fix}") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be {what}; the file is corrupt. Fix: {fix}") from None
    if require_object and not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {json_kind(data)}; the file is corrupt. Fix: {fix}")
    return data


def read_jsonl(path: str | Path, error: type[MiloraError], what: str) -> Iterator[tuple[str, Any]]:
    """(where, value) for each non-blank line of a JSON Lines file, where = "PATH:LINE". A
    missing file, a line that is not UTF-8 or not JSON, or one nested too deeply is `error`
    naming the file and line; `what` says what a line should hold ("one request object")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist; expected a JSONL file, {what} per line")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc}); expected a JSONL file") from None
    for n, line in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected {what} per line, "
                        "UTF-8 encoded") from None
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); expected {what} per line") \
                from None
        except RecursionError:
            raise error(f"{where}: JSON nested too deeply; expected {what} per line") from None
        yield where, value


def json_kind(value: Any) -> str:
    """'a JSON array', 'null', ...: what a parsed value is, in JSON's words."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"),
                       ((int, float), "number")):
        if isinstance(value, kind):
            return f"a JSON {name}"
    return type(value).__name__
