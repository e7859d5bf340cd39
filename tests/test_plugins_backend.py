"""The TensorRT backend (milora.plugins.trt_backend) without TensorRT: binding plans and shapes,
and its whole logic (banks uploaded per slot change, rows bound per membership change, KV on
the device between steps, membership changes through the host) driven by milora.runtime.Engine
with onnxruntime sessions of the same graphs standing in for the engines, against the
onnxruntime backend. Runs on real engines are marked tensorrt."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest

from milora.errors import CapacityError, ManifestError, RequestError
from milora.format import manifest as mf
from milora.plugins import binding as bd
from milora.plugins.profiles import Range
from milora.runtime import Engine, SamplingParams
from milora.runtime.backend import Backend
from plugins_helpers import ROOT, python_env, stand_in_backend, tensorrt_export
from runtime_helpers import random_prompts

LIMITS = {"batch": Range(1, 2, 4), "sequence": Range(1, 8, 16), "decode_tokens": Range(1, 1, 4),
          "past": Range(1, 16, 40)}
TENANTS = ("alpha", "beta", "gamma", "delta")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tensorrt_export(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def manifest(export):
    return mf.read_manifest(export)


def engine_pair(export, max_batch=4):
    """(Engine on the stand-in TensorRT backend, Engine on onnxruntime) of one export."""
    backends = []

    def factory(bundle):
        backends.append(stand_in_backend(bundle, LIMITS))
        return backends[-1]

    return Engine(export, backend=factory, max_batch=max_batch), Engine(export, max_batch=max_batch), backends


def test_binding_plans_match_the_graphs_outputs(export, manifest):
    import onnxruntime as ort

    for graph, (b, t, p) in (("prefill", (3, 5, 0)), ("decode", (2, 3, 7))):
        plan = bd.plan(manifest, graph, b, t, p)
        assert [x.name for x in plan["inputs"]] == [i["name"] for i in manifest["graphs"][graph]["inputs"]]
        sess = ort.InferenceSession(str(export / manifest["graphs"][graph]["file"]))
        rng = np.random.default_rng(0)
        feeds = {}
        for x in plan["inputs"]:
            if x.dtype == np.int64:
                feeds[x.name] = np.zeros(x.shape, np.int64) if x.name != mf.ATTENTION_MASK else np.ones(x.shape, np.int64)
            else:
                feeds[x.name] = rng.standard_normal(x.shape).astype(x.dtype) * (0 if x.name.startswith("lora") else 1)
        outs = sess.run([o.name for o in plan["outputs"]], feeds)
        assert [o.shape for o in outs] == [x.shape for x in plan["outputs"]]
        assert all(o.dtype == x.dtype for o, x in zip(outs, plan["outputs"]))


def test_capacities_are_the_largest_calls(manifest):
    cap = bd.capacities(manifest, "decode", LIMITS)
    hkv, hd, v = manifest["base"]["num_kv_heads"], manifest["base"]["head_dim"], manifest["base"]["vocab_size"]
    assert cap[mf.INPUT_IDS] == 4 * 4 * 8
    assert cap[mf.ATTENTION_MASK] == 4 * (40 + 4) * 8
    assert cap[mf.present_key(0)] == 4 * hkv * 44 * hd * 4
    assert cap[mf.LOGITS] == 4 * 4 * v * 4
    assert bd.capacities(manifest, "prefill", LIMITS)[mf.LOGITS] == 4 * 1 * v * 4  # last position only


def test_calls_outside_the_profile_are_capacity_errors():
    bd.check_call("decode", LIMITS, 4, 4, 40)
    for args, what, flag in (((5, 1, 3), "5 rows (the engines take 1:2:4)", "--batch"),
                             ((2, 5, 3), "5 new tokens", "--decode-tokens"),
                             ((2, 1, 41), "41 cached tokens (the engines take 1:16:40)", "--past")):
        with pytest.raises(CapacityError, match=rf"decode engine cannot run {re.escape(what)}.*rebuild with "
                                                rf"milora-build-engines and a larger {flag} maximum"):
            bd.check_call("decode", LIMITS, *args)
    with pytest.raises(CapacityError, match="17 prompt tokens"):
        bd.check_call("prefill", LIMITS, 1, 17)


def test_bank_layout_puts_each_slot_contiguously(manifest):
    layout = bd.bank_layout(manifest)
    assert set(layout) == set(manifest["banks"])
    spec, per_slot = layout[mf.lora_b_bank("down_proj")]
    assert spec.shape == (manifest["slots"], *manifest["banks"][mf.lora_b_bank("down_proj")]["shape"])
    assert per_slot * manifest["slots"] == spec.nbytes


def test_the_backend_implements_the_interface(export):
    trt_engine, _, backends = engine_pair(export)
    assert isinstance(backends[0], Backend)
    trt_engine.close()


def test_engine_on_the_stand_in_backend_equals_onnxruntime(export):
    """Mixed tenants and the base model, rows of different lengths joining and leaving: the same
    tokens as the onnxruntime backend (the stand-in runs the same graphs, so only the backend's
    bookkeeping could make them differ)."""
    trt_engine, ort_engine, backends = engine_pair(export, max_batch=3)
    prompts = random_prompts(3, (5, 1, 9, 3, 7, 2))
    tenants = [TENANTS[i % 4] if i != 4 else None for i in range(len(prompts))]
    results = []
    for engine in (trt_engine, ort_engine):
        reqs = [engine.submit(t, prompt_ids=p, params=SamplingParams(max_new_tokens=4 + i % 3, ignore_eos=True))
                for i, (t, p) in enumerate(zip(tenants, prompts))]
        engine.run_until_done()
        results.append([r.output_ids for r in reqs])
    assert results[0] == results[1]
    runner = backends[0].runners["decode"]
    assert max(s[mf.INPUT_IDS][0] for s in runner.calls) == 3, "up to max_batch rows decode together"
    assert len(backends[0].runners["prefill"].calls) >= 2


def test_banks_upload_per_slot_change_and_rows_per_membership_change(export):
    trt_engine, _, backends = engine_pair(export, max_batch=2)
    backend = backends[0]
    uploads = {"slot": 0, "rows": 0}
    write_slot, bind_rows = backend.write_slot, backend.bind_rows

    def counting_write(slot, pack):
        uploads["slot"] += 1
        return write_slot(slot, pack)

    def counting_bind(slots, gates):
        uploads["rows"] += 1
        return bind_rows(slots, gates)

    backend.write_slot, backend.bind_rows = counting_write, counting_bind
    trt_engine.generate("alpha", prompt_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=6, ignore_eos=True))
    trt_engine.generate("alpha", prompt_ids=[8, 9], params=SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert uploads["slot"] == 1, "the tenant's banks are uploaded when it is first loaded, not per request or step"
    decode_calls = len(backend.runners["decode"].calls)
    assert decode_calls == 10 and uploads["rows"] == 4, "rows bound when a request joins and leaves, not per step"


def test_slot_writes_land_in_their_slot_only(export, manifest):
    trt_engine, _, backends = engine_pair(export)
    backend = backends[0]
    name = mf.lora_a_bank("q_proj")
    buf, per_slot, spec = backend.banks[name]
    before = backend.dev.download(buf, spec.shape, spec.dtype)
    pack = {n: np.full(s.shape[1:], 3, dtype=s.dtype) for n, (_, _, s) in backend.banks.items()}
    backend.write_slot(2, pack)
    after = backend.dev.download(buf, spec.shape, spec.dtype)
    assert (after[2] == 3).all()
    np.testing.assert_array_equal(np.delete(after, 2, axis=0), np.delete(before, 2, axis=0))
    backend.clear_slot(2)
    assert (backend.dev.download(buf, spec.shape, spec.dtype)[2] == 0).all()
    with pytest.raises(ManifestError, match=rf"slot pack tensor {name} has shape"):
        backend.write_slot(1, dict(pack, **{name: np.zeros((1, 2))}))
    trt_engine.close()


def test_scoring_and_extend_through_the_backend(export):
    from milora.runtime.scoring import score_options

    trt_engine, ort_engine, _ = engine_pair(export)
    options = [[5, 6], [7], [8, 9, 10]]
    got = score_options(trt_engine, "beta", [11, 12, 13], options)
    want = score_options(ort_engine, "beta", [11, 12, 13], options)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_prefill_beyond_the_batch_maximum_runs_in_chunks(export):
    trt_engine, ort_engine, _ = engine_pair(export)
    prompts = random_prompts(5, (3, 4, 2, 6, 5, 1))  # 6 rows, the engines take 4
    slots = [1, 2, 3, 4, 0, 1]
    got = trt_engine.backend.prefill(prompts, slots)
    want = ort_engine.backend.prefill(prompts, slots)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
    assert got[2].mask.tolist() == want[2].mask.tolist()


def test_bad_calls_are_refused_before_the_engine_runs(export):
    trt_engine, _, backends = engine_pair(export)
    backend = backends[0]
    with pytest.raises(RequestError, match=r"tenant slot\(s\) \[-1\] out of range; this export has slots 0..4"):
        backend.prefill([[5]], [-1])
    with pytest.raises(CapacityError, match="17 prompt tokens"):
        backend.prefill([list(range(3, 20))], [1])
    _, gates, kv = backend.prefill([[5, 6]], [1])
    rows = backend.bind_rows(np.array([1, 1]), np.repeat(gates, 2, axis=0))
    with pytest.raises(RequestError, match="expected the same running rows"):
        backend.decode(np.array([5, 6]), kv, rows)
    assert not backend.runners["decode"].calls


def test_the_backend_imports_neither_torch_nor_transformers():
    code = ("import sys, milora.plugins.trt_backend, milora.plugins.build, milora.plugins.device; "
            "bad = [m for m in ('torch', 'transformers', 'tensorrt', 'triton') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(False), cwd=ROOT)
    assert proc.returncode == 0, f"imported {proc.stdout.strip()} {proc.stderr[-500:]}"


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_opening_engines_says_what_to_install(export, tmp_path):
    from milora.errors import DependencyError
    from milora.plugins import profiles as pf
    from milora.plugins.trt_backend import tensorrt_backend

    eng = tmp_path / "eng"
    eng.mkdir()
    doc = {"format": pf.ENGINES_FORMAT, "graphs": {g: {"file": pf.engine_file(g)} for g in pf.GRAPHS},
           "source": {"manifest_sha256": mf.sha256_file(export / mf.MANIFEST_FILE)},
           "options": {k: str(v) for k, v in LIMITS.items()}}
    import json

    (eng / pf.ENGINES_FILE).write_text(json.dumps(doc))
    for g in pf.GRAPHS:
        (eng / pf.engine_file(g)).write_bytes(b"x")
    with pytest.raises(DependencyError, match=r"TensorRT is not installed.*pip install 'milora\[tensorrt\]'"):
        Engine(export, backend=tensorrt_backend(eng))


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (it needs an NVIDIA GPU; pip install "
                    "'milora[tensorrt]' milora[kernels]): this builds the tiny export's engines and serves them")
def test_engine_on_real_engines_equals_onnxruntime(export, tmp_path):
    from milora.plugins import profiles as pf
    from milora.plugins.build import build_engines
    from milora.plugins.trt_backend import tensorrt_backend

    build_engines(export, tmp_path / "eng", pf.BuildOptions(precision="fp32", **LIMITS))
    prompts = random_prompts(3, (5, 1, 9, 3))
    results = []
    for engine in (Engine(export, backend=tensorrt_backend(tmp_path / "eng"), max_batch=4), Engine(export)):
        reqs = [engine.submit(TENANTS[i], prompt_ids=p, params=SamplingParams(max_new_tokens=4, ignore_eos=True))
                for i, p in enumerate(prompts)]
        engine.run_until_done()
        results.append([r.output_ids for r in reqs])
    assert results[0] == results[1]
