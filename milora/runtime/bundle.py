"""An opened export directory (OUT_DIR): manifest, verified files, tokenizer, chat template.

Reads only what milora-export wrote (milora.format.manifest is torch-free); imports neither
torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milora.errors import ManifestError
from milora.format import manifest as mf
from milora.format.jsonfile import read_json


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

        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
            raise ManifestError(f"{tok_path} cannot be read as a tokenizer ({str(exc)[:200]}); the file is corrupt: "
                                "export again") from None
        tok_cfg = _read_json(root / "tokenizer_config.json")
        gen_cfg = _read_json(root / "generation_config.json")
        special = {k: _token_text(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        special = {k: v for k, v in special.items() if v}
        vocab = manifest["base"]["vocab_size"]
        eos_ids = _token_ids(gen_cfg.get("eos_token_id"), "eos_token_id", vocab, root)
        if not eos_ids and special.get("eos_token"):
            tid = tokenizer.token_to_id(special["eos_token"])
            eos_ids = [tid] if tid is not None else []
        pad = _token_ids(gen_cfg.get("pad_token_id"), "pad_token_id", vocab, root)
        if not pad and special.get("pad_token"):
            tid = tokenizer.token_to_id(special["pad_token"])
            pad = [tid] if tid is not None else []
        # Any id in range works as padding: the graphs ignore masked positions (docs/export.md).
        pad_id = pad[0] if pad else (eos_ids[0] if eos_ids else 0)
        if not 0 <= pad_id < vocab:
            pad_id = 0
        template = tok_cfg.get("chat_template")
        jinja = root / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8", errors="replace")
        if template is not None and not isinstance(template, str):
            # A list of named templates ({"name", "template"}): use "default" as transformers does.
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)} \
                if isinstance(template, list) else {}
            template = named.get("default") if isinstance(named.get("default"), str) else None
        return cls(root, manifest, tokenizer, tuple(eos_ids), pad_id, template, special)

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
        try:
            text = env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True,
                                                              **self.special_tokens)
        except ManifestError:
            raise
        except Exception as exc:  # noqa: BLE001 - the template is code from the model directory: any error is its own
            raise ManifestError(f"the chat template of {self.root} failed on these messages ({type(exc).__name__}: "
                                f"{str(exc)[:200]}); expected a Hugging Face chat template. Fix: correct "
                                "chat_template in the model's tokenizer_config.json and export again, or pass a "
                                "plain prompt") from None
        if not isinstance(text, str):
            raise ManifestError(f"the chat template of {self.root} did not render text; export again")
        return text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_json(path, ManifestError, "export again (the file is copied from the model directory)")


def _token_ids(value: Any, key: str, vocab: int, root: Path) -> list[int]:
    """generation_config's eos_token_id / pad_token_id: an id or a list of ids, each in the vocabulary."""
    ids = [value] if not isinstance(value, list) else value
    ids = [i for i in ids if i is not None]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
        raise ManifestError(f"{root / 'generation_config.json'}: {key}={value!r}; expected token ids in "
                            f"0..{vocab - 1}. Fix: correct the file (it was copied from the model directory) or "
                            "export again")
    return list(ids)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None
