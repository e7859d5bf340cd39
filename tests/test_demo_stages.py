"""milora-demo's stage caching with the heavy work faked (no model, no training, no export):
a warm run builds nothing and scores nothing; a changed tenant is retrained, and the export
and the scores made from it are made again; --force redoes all but the base model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from milora import assets, demo, demo_build
from milora.errors import DataError, MiloraError
from milora.stages import atomic_write_json, read_cached_json, run_isolated
from milora.train import demo as tenant_demo


class Fakes:
    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.weights: dict[str, bytes] = {}  # what the next training of a tenant writes


@pytest.fixture
def fakes(monkeypatch):
    f = Fakes()
    monkeypatch.setattr(tenant_demo, "DEMO_TENANTS", {
        "alpha": tenant_demo.DemoTenant("arc_e", steps=2, batch_size=2, max_length=64),
        "beta": tenant_demo.DemoTenant("gsm_symbolic", steps=2, batch_size=2, max_length=64, top_k=2)})

    def smollm2_dir(cache=None):
        f.calls["materialise"] += 1
        d = Path(cache) / assets.SMOLLM2_DIRNAME
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"base weights")
        (d / assets._COMPLETE_MARKER).write_text("x")
        return d

    def train_tenant(name, root, base="smollm2", progress=True):
        f.calls[f"train:{name}"] += 1
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "milora_config.json").write_text("{}")
        (d / "milora_adapter.safetensors").write_bytes(f.weights.get(name, name.encode()))
        (d / tenant_demo.DEMO_INFO).write_text(json.dumps({"recipe": tenant_demo.recipe(name), "steps": 2,
                                                           "train_losses": [2.0, 1.0]}))
        (d / tenant_demo._MARKER).write_text("ok\n")
        return d

    def export(base, out, adapters=None, force=False, **options):
        from milora.format import manifest as mf

        f.calls["export"] += 1
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prefill.onnx").write_text(f"graph of {sorted(adapters)}")
        from test_fuzz_loaders import valid_manifest  # a manifest that passes the schema check

        mf.write_manifest(out, {**valid_manifest(), "validation": {"cases": 2, "max_error": {"logits": 1e-5}}})
        return mf.read_manifest(out)

    def compute_scores(engine, tenant_tasks, progress=True):
        f.calls["score"] += 1
        return [{"tenant": t, "task": task, "keys": ["k1", "k2"], "tenant_result": {"correct": [True, False]},
                 "base_result": {"correct": [False, False]}} for t, task in tenant_tasks.items()]

    monkeypatch.setattr(assets, "smollm2_dir", smollm2_dir)
    monkeypatch.setattr(tenant_demo, "train_tenant", train_tenant)
    monkeypatch.setattr("milora.export.exporter.export", export)
    monkeypatch.setattr(demo, "compute_scores", compute_scores)
    return f


def run_once(cache: Path, force: bool = False):
    """build + scores, in this process, as milora.demo.run does (without serving)."""
    built = demo_build.build(cache, force=force, isolate=False, progress=False, say=lambda m: None)
    rows, cached = demo.scores(built, None, force, progress=False, say=lambda m: None)
    return built, rows, cached


def test_a_warm_run_builds_and_scores_nothing(tmp_path, fakes):
    built, rows, cached = run_once(tmp_path)
    assert built.rebuilt == ["base", "tenant:alpha", "tenant:beta", "export"] and not cached
    assert fakes.calls == Counter({"materialise": 1, "train:alpha": 1, "train:beta": 1, "export": 1, "score": 1})
    again, rows2, cached2 = run_once(tmp_path)
    assert again.rebuilt == [] and cached2 and rows2 == rows
    assert fakes.calls == Counter({"materialise": 1, "train:alpha": 1, "train:beta": 1, "export": 1, "score": 1})
    # The cache layout the docs describe; no temporary files left behind.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["demo-export", "demo-export.inputs.json", "demo-export.scores.json", "demo-tenants",
                     assets.SMOLLM2_DIRNAME]
    row = demo.score_rows(rows)[0]
    assert (row.tenant, row.tenant_score.accuracy, row.base_score.accuracy, row.diff) == ("alpha", 0.5, 0.0, 0.5)


def test_a_changed_recipe_retrains_that_tenant_and_invalidates_export_and_scores(tmp_path, fakes, monkeypatch):
    run_once(tmp_path)
    specs = dict(tenant_demo.DEMO_TENANTS)
    specs["beta"] = tenant_demo.DemoTenant("gsm_symbolic", steps=3, batch_size=2, max_length=64, top_k=2)
    monkeypatch.setattr(tenant_demo, "DEMO_TENANTS", specs)
    fakes.weights["beta"] = b"beta trained longer"
    built, _, cached = run_once(tmp_path)
    assert built.rebuilt == ["tenant:beta", "export"] and not cached
    assert fakes.calls["train:alpha"] == 1 and fakes.calls["train:beta"] == 2
    assert fakes.calls["export"] == 2 and fakes.calls["score"] == 2


def test_an_adapter_changed_on_disk_invalidates_export_and_scores(tmp_path, fakes):
    built, _, _ = run_once(tmp_path)
    (built.tenants["alpha"] / "milora_adapter.safetensors").write_bytes(b"replaced by hand")
    again, _, cached = run_once(tmp_path)
    assert again.rebuilt == ["export"] and not cached  # the tenant's recipe is unchanged: not retrained
    assert fakes.calls["export"] == 2 and fakes.calls["score"] == 2


def test_a_tampered_or_unstamped_export_is_made_again(tmp_path, fakes):
    built, _, _ = run_once(tmp_path)
    (built.out_dir / "prefill.onnx").write_text("tampered")
    assert run_once(tmp_path)[0].rebuilt == ["export"]
    demo_build.stamp_path(built.out_dir).unlink()  # as an export interrupted before its stamp
    assert run_once(tmp_path)[0].rebuilt == ["export"]
    assert fakes.calls["export"] == 3


def test_unreadable_scores_are_computed_again(tmp_path, fakes):
    built, _, _ = run_once(tmp_path)
    demo_build.scores_path(built.out_dir).write_text("{ half-written")
    assert run_once(tmp_path)[2] is False and fakes.calls["score"] == 2
    assert run_once(tmp_path)[2] is True and fakes.calls["score"] == 2


def test_force_retrains_exports_and_scores_but_keeps_the_base(tmp_path, fakes):
    run_once(tmp_path)
    built, _, cached = run_once(tmp_path, force=True)
    assert built.rebuilt == ["tenant:alpha", "tenant:beta", "export"] and not cached
    assert fakes.calls == Counter({"materialise": 1, "train:alpha": 2, "train:beta": 2, "export": 2, "score": 2})


def test_atomic_json_and_read_cached_json(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"a": 1})
    assert read_cached_json(path) == {"a": 1} and [p.name for p in path.parent.iterdir()] == ["x.json"]
    assert read_cached_json(tmp_path / "missing.json") is None


def _fail(message: str) -> None:
    raise DataError(message)


def test_run_isolated_returns_the_value_and_the_childs_error(tmp_path):
    res = run_isolated("probe", sorted, [3, 1, 2])
    assert res.value == [1, 2, 3] and res.peak_rss > 10_000_000  # a real child, which reports its peak
    with pytest.raises(DataError, match="bad item 7"):
        run_isolated("probe", _fail, "bad item 7")
    assert issubclass(DataError, MiloraError)


def test_the_demo_parent_imports_no_torch():
    code = ("import sys, milora.demo, milora.demo_build, milora.demo_view, milora.progress, milora.stages, "
            "milora.train.demo; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"imported {proc.stdout.strip()} {proc.stderr[-500:]}"
