"""An opened export directory (OUT_DIR): manifest, verified files, tokenizer, chat template.

Reads only what milora-export wrote (milora.export.manifest is torch-free); imports neither
torch nor transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milora.errors import ManifestError
from milora.export import manifest as mf


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    tokenizer: Any  # tokenizers.Tokenizer
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    chat_template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> "Bundle":
        root = Path(root)
        if not root.is_dir():
            raise ManifestError(f"{root} is not a directory; expected an OUT_DIR written by milora-export")
        manifest = mf.read_manifest(root)
        if verify:
            mf.verify_files(root, manifest)
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise ManifestError(f"{root} has no tokenizer.json; export again from a model directory with a "
                                "fast tokenizer")
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_path))
        tok_cfg = _read_json(root / "tokenizer_config.json")
        gen_cfg = _read_json(root / "generation_config.json")
        special = {k: _token_text(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        special = {k: v for k, v in special.items() if v}
        eos = gen_cfg.get("eos_token_id", None)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not eos_ids and special.get("eos_token"):
            tid = tokenizer.token_to_id(special["eos_token"])
            eos_ids = [tid] if tid is not None else []
        pad = gen_cfg.get("pad_token_id")
        if pad is None and special.get("pad_token"):
            pad = tokenizer.token_to_id(special["pad_token"])
        template = tok_cfg.get("chat_template")
        jinja = root / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        return cls(root, manifest, tokenizer, tuple(int(e) for e in eos_ids),
                   int(pad if pad is not None else (eos_ids[0] if eos_ids else 0)), template, special)

    @property
    def num_layers(self) -> int:
        return self.manifest["base"]["num_layers"]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render messages with the tokenizer's chat template (jinja2, sandboxed) and an
        assistant generation prompt."""
        if not self.chat_template:
            raise ManifestError("this export's tokenizer has no chat template; pass a plain prompt instead")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ManifestError(f"chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True,
                                                           **self.special_tokens)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        return value.get("content")
    return value if isinstance(value, str) else None
