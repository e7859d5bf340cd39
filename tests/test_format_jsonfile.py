"""milora.format.jsonfile.read_json: the one reader behind manifest.json, adapter configs,
tokenizer JSON, PEFT configs, engines.json and --config files."""

from __future__ import annotations

import pytest

from milora.errors import ConfigError, ManifestError
from milora.format.jsonfile import json_kind, read_json


@pytest.mark.parametrize("raw, needle", [
    (b'{"a": 1', "is not valid JSON"),
    (b'{"a": "\xff"}', "is not valid JSON"),  # not UTF-8
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply to be a widget"),
    (b"[1, 2]", "must hold a JSON object, got a JSON array"),
    (b"null", "must hold a JSON object, got null"),
])
def test_bad_files_raise_the_callers_error_with_path_and_fix(tmp_path, raw, needle):
    path = tmp_path / "w.json"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as err:
        read_json(path, ConfigError, "write it again", "a widget")
    message = str(err.value)
    assert str(path) in message and needle in message and message.endswith("Fix: write it again"), message


def test_unreadable_path_and_non_objects_when_allowed(tmp_path):
    with pytest.raises(ManifestError, match="cannot be read"):
        read_json(tmp_path, ManifestError, "export again")  # a directory
    (tmp_path / "a.json").write_text("[1, 2]")
    assert read_json(tmp_path / "a.json", ManifestError, "x", require_object=False) == [1, 2]
    (tmp_path / "o.json").write_text('{"k": [true, null]}')
    assert read_json(tmp_path / "o.json", ManifestError, "x") == {"k": [True, None]}


def test_json_kind_names_values_in_jsons_words():
    assert [json_kind(v) for v in (None, True, 1, 1.5, "s", [], {})] == [
        "null", "a JSON boolean", "a JSON number", "a JSON number", "a JSON string", "a JSON array", "a JSON object"]
