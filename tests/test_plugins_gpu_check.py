"""benchmarks/gpu_check.py, the GPU check of the routed LoRA kernel, run on a CPU: its
correctness section and one tiny microbenchmark under the Triton interpreter (--tiny), so the
script a GPU machine runs is exercised end to end here; only the CUDA timing paths are not."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: pip install 'milora[kernels]' (triton==3.9.0 installs "
                                     "on CPU) to run the GPU check's CPU parts in the Triton interpreter")

from plugins_helpers import ROOT, run_json  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    summary = run_json([str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out)], interpret=True)
    return summary, json.loads(out.read_text())


def test_every_correctness_case_passes(report):
    summary, doc = report
    failed = [c for c in doc["correctness"]["cases"] if not c["ok"]]
    assert not failed, failed[0]
    assert summary["correctness"] == {"passed": len(doc["correctness"]["cases"]), "failed": 0}
    names = {c["name"].rsplit("_", 1)[0] for c in doc["correctness"]["cases"]}
    for edge in ("no_active_row", "all_rows_active", "one_row_one_token", "nan_in_one_tenants_bank",
                 "nan_gate_stays_in_its_row", "slot_zero_bit_for_bit"):
        assert edge in names, sorted(names)
    assert {c["name"].split("_")[-1] for c in doc["correctness"]["cases"]} >= {"float32", "float16", "bfloat16"}


def test_microbenchmark_rows_have_every_measure(report):
    _, doc = report
    (row,) = doc["layers"]
    for key in ("routed_s", "dense_s", "base_s", "routed_no_active_row_s", "routed_bytes", "speedup_vs_dense",
                "routed_over_base", "achieved_Bps", "bandwidth_fraction_of_peak", "best_tactic"):
        assert key in row, key
    assert row["routed_s"] > 0 and row["dense_s"] > 0 and row["base_s"] > 0
    assert row["routed_bytes"] > 0


def test_targets_are_reported_not_claimed_on_a_cpu(report):
    _, doc = report
    t = doc["targets"]
    assert t["speedup_vs_dense"]["target"] == 2.0 and t["bandwidth_fraction"]["target"] == 0.7
    assert t["speedup_vs_dense"]["met"] is False and t["bandwidth_fraction"]["value"] is None
    assert doc["info"]["device"] == "cpu" and doc["tiny"] is True
