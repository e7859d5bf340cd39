"""milora-export on tiny random models: both graphs against the per-row PyTorch reference
(mixed tenants, left padding, prompt length 1, several decode steps), the manifest, the
lowerings, fp16, the TensorRT-target graph, and evidence that unused modules are skipped."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from export_helpers import TENANTS, make_model_dir, save_peft
from milora.format.contract import EXPERTS, NUM_EXPERTS
from milora.errors import ExportError, ValidationError
from milora.format import manifest as mf
from milora.format.pack import assemble_banks, default_slots
from milora.export.exporter import export, load_base
from milora.export.tenants import load_tenants
from milora.export.validate import Row, run_graphs, sessions, validate
from milora.format.tolerances import close

FAST = dict(progress=False, decode_steps=2)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_src")
    return make_model_dir(root), save_peft(root / "peft")


@pytest.fixture(scope="module")
def exported(src, tmp_path_factory):
    """The default export (fp32, default lowering), validated by export() itself."""
    model_dir, peft = src
    out = tmp_path_factory.mktemp("export_out") / "out"
    manifest = export(model_dir, out, {"plain": peft}, **FAST)
    return out, manifest


@pytest.fixture(scope="module")
def reference(src, exported):
    model_dir, peft = src
    out, manifest = exported
    hf = load_base(model_dir, "float32")
    tenants = {t.name: t for t in load_tenants(model_dir, {"plain": peft}, manifest["base"])}
    return hf, tenants


def _rows(rng, names, lengths, steps=3, vocab=96):
    return [Row(n, rng.integers(3, vocab, k).tolist(), rng.integers(3, vocab, steps).tolist())
            for n, k in zip(names, lengths)]


def test_export_validates_every_tenant_kind(exported):
    out, manifest = exported
    assert sorted(manifest["tenants"]) == sorted([*TENANTS, "plain"])
    assert manifest["tenants"]["plain"]["kind"] == "peft"
    assert manifest["tenants"]["plain"]["options"]["routed"] == 0
    assert {manifest["tenants"][n]["config"]["rank"] for n in manifest["tenants"]} == {2, 3, 4}
    v = manifest["validation"]
    assert v["compared_selections"] > 0 and v["skipped_rows"] == []
    assert v["max_error"]["decode/logits"] < 1e-4 and v["max_error"]["gates"] < 1e-5


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_graphs_match_reference_mixed_batches(exported, reference, batch):
    """B = 1..4, tenants mixed (base row and PEFT row included), left padding, a prompt of
    length 1, three decode steps."""
    out, manifest = exported
    hf, tenants = reference
    rng = np.random.default_rng(batch)
    pool = [None, "alpha", "beta", "gamma", "delta", "plain"]
    names = [pool[(batch + i) % len(pool)] for i in range(batch)]
    lengths = [1] + [int(x) for x in rng.integers(2, 9, batch - 1)]
    rows = _rows(rng, names, lengths)
    report = validate(out, manifest, hf, tenants, [rows])
    assert report.max_error["decode/logits"] < 1e-4
    assert not report.skipped_rows


def test_swapped_slots_fail_validation(exported, reference):
    """Break routing on purpose: swap two tenants' slots in the manifest the graphs are fed
    from; the validation must fail and name the outputs."""
    out, manifest = exported
    hf, tenants = reference
    broken = json.loads(json.dumps(manifest))
    a, b = broken["tenants"]["alpha"], broken["tenants"]["beta"]
    a["pack"], b["pack"] = b["pack"], a["pack"]
    rows = _rows(np.random.default_rng(0), ["alpha", "beta"], [5, 4])
    with pytest.raises(ValidationError, match="logits"):
        validate(out, broken, hf, tenants, [rows])


def test_zeroed_gates_change_decode(exported, reference):
    """The decode graph really reads the gates: zeroed gates give other logits than the
    prefill's gates (for a routed tenant)."""
    out, manifest = exported
    rows = _rows(np.random.default_rng(1), ["alpha", "delta"], [4, 6], steps=1)
    sess = sessions(out, manifest)
    res = run_graphs(out, manifest, rows, sess)
    banks = assemble_banks(out, manifest, default_slots(manifest))
    feeds = {mf.INPUT_IDS: np.array([[5], [6]]), mf.ATTENTION_MASK: res["final_mask"],
             mf.TENANT_SLOTS: np.array([manifest["tenants"]["alpha"]["slot"], manifest["tenants"]["delta"]["slot"]]),
             mf.GATES: np.zeros((2, manifest["base"]["num_layers"], NUM_EXPERTS), np.float32)}
    for i in range(manifest["base"]["num_layers"]):
        feeds[mf.past_key(i)] = res["prefill"][mf.present_key(i)]
        feeds[mf.past_value(i)] = res["prefill"][mf.present_value(i)]
    feeds.update({n: banks[n] for n in mf.bank_names("decode")})
    zeroed = sess["decode"].run([mf.LOGITS], feeds)[0]
    feeds[mf.GATES] = res["prefill"][mf.GATES]
    routed = sess["decode"].run([mf.LOGITS], feeds)[0]
    assert np.abs(zeroed - routed).max() > 1e-3


def test_manifest_matches_files_and_graphs(exported):
    import onnxruntime as ort

    out, manifest = exported
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {mf.MANIFEST_FILE}
    assert set(manifest["files"]) == files
    assert set(manifest) == set(mf.MANIFEST_KEYS)
    mf.verify_files(out, manifest)
    for graph, spec in manifest["graphs"].items():
        sess = ort.InferenceSession(str(out / spec["file"]))
        got = {i.name: (list(i.shape), i.type) for i in sess.get_inputs()}
        want = {i["name"]: (i["shape"], f"tensor({i['dtype'].replace('float32', 'float')})") for i in spec["inputs"]}
        assert got == {k: (s, t.replace("float16", "float16")) for k, (s, t) in want.items()}
        assert [o.name for o in sess.get_outputs()] == [o["name"] for o in spec["outputs"]]
        assert [o.shape for o in sess.get_outputs()] == [o["shape"] for o in spec["outputs"]]
    # The default prefill emits the last position only; decode emits its T new positions.
    assert manifest["graphs"]["prefill"]["logits_positions"] == mf.LOGITS_LAST
    assert manifest["graphs"]["prefill"]["outputs"][0]["shape"] == [mf.AXIS_BATCH, 1, manifest["base"]["vocab_size"]]
    assert manifest["graphs"]["decode"]["logits_positions"] == mf.LOGITS_ALL
    decode_inputs = {i["name"] for i in manifest["graphs"]["decode"]["inputs"]}
    assert not decode_inputs & set(mf.ROUTER_BANKS), "the decode graph must not take router banks"
    assert mf.GATES in decode_inputs


def test_decode_graph_contains_no_router(exported):
    out, manifest = exported
    prefill = onnx.load(str(out / mf.PREFILL_FILE), load_external_data=False)
    decode = onnx.load(str(out / mf.DECODE_FILE), load_external_data=False)
    routers = lambda g: [n for n in g.graph.node if any(i in mf.ROUTER_BANKS for i in n.input)]  # noqa: E731
    assert routers(prefill) and not routers(decode)
    assert all(o.name != mf.GATES for o in decode.graph.output)


def _profiled_lora_rows(path, feeds, profile_dir) -> dict[str, int]:
    """Run once with onnxruntime profiling; per module, the rows its LoRA MatMuls multiplied
    (summed over layers; a node that never ran contributes nothing)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(profile_dir / "profile")
    sess = ort.InferenceSession(str(path), so)
    sess.run(None, feeds)
    events = json.loads(open(sess.end_profiling()).read())
    rows = {m: 0 for m in EXPERTS}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and "/lora/" in name and "MatMulA" in name and name.endswith("_kernel_time"):
            rows[name.split("/")[3]] += e["args"]["input_type_shape"][0]["float"][0]
    return rows


# rows multiplied per module (2 layers) when row 0 uses q_proj and row 1 uses k_proj only
EXPECTED_ROWS = {"dense": {m: 4 for m in EXPERTS}, "if_skip": {"q_proj": 4, "k_proj": 4},
                 "compact": {"q_proj": 2, "k_proj": 2}, "if_compact": {"q_proj": 2, "k_proj": 2}}


@pytest.mark.parametrize("lowering", ["if_skip", "compact", "if_compact", "dense"])
def test_unused_modules_are_not_computed(src, tmp_path, lowering):
    """Every lowering validates against the reference. Then decode with row 0 on q_proj and
    row 1 on k_proj only: onnxruntime's node profile shows if_skip running no LoRA MatMul for
    the 5 unused modules, compact multiplying only the rows that use a module (zero rows
    elsewhere), dense multiplying every row of every module."""
    model_dir, _ = src
    out = tmp_path / "out"
    manifest = export(model_dir, out, lora_lowering=lowering, progress=False, decode_steps=1)  # validated
    assert manifest["lora_lowering"] == lowering and manifest["validation"]["compared_selections"] > 0
    onnx.checker.check_model(str(out / mf.DECODE_FILE), full_check=True)
    nl = manifest["base"]["num_layers"]
    rng = np.random.default_rng(0)
    gates = np.zeros((2, nl, NUM_EXPERTS), np.float32)
    gates[0, :, EXPERTS.index("q_proj")] = gates[1, :, EXPERTS.index("k_proj")] = 0.7
    feeds = {mf.INPUT_IDS: rng.integers(3, 96, (2, 1)), mf.ATTENTION_MASK: np.ones((2, 4), np.int64),
             mf.TENANT_SLOTS: np.array([1, 2]), mf.GATES: gates}
    for i in range(nl):
        for name in (mf.past_key(i), mf.past_value(i)):
            feeds[name] = rng.standard_normal((2, manifest["base"]["num_kv_heads"], 3,
                                               manifest["base"]["head_dim"])).astype(np.float32)
    banks = assemble_banks(out, manifest, default_slots(manifest))
    feeds.update({n: banks[n] for n in mf.bank_names("decode")})
    rows = _profiled_lora_rows(out / mf.DECODE_FILE, feeds, tmp_path)
    assert rows == {m: EXPECTED_ROWS[lowering].get(m, 0) for m in EXPERTS}


def test_fp16_export_validates(src, tmp_path):
    model_dir, peft = src
    manifest = export(model_dir, tmp_path / "out", {"plain": peft}, dtype="fp16", **FAST)
    assert manifest["dtype"] == "float16"
    banks = manifest["banks"]
    assert banks[mf.lora_a_bank("q_proj")]["dtype"] == "float16" and banks[mf.ROUTER_WEIGHT]["dtype"] == "float32"
    assert manifest["validation"]["compared_selections"] > 0
    assert manifest["validation"]["max_error"]["decode/logits"] < 6e-2


def test_tensorrt_target_runs_python_op_and_function(src, tmp_path):
    """One RoutedLora node per (layer, module) in the milora domain, tagged for TensorRT,
    with a model-local function body; validated with the Python op and with the body."""
    from milora.export import pyop
    from milora.export import routed_lora as rl

    model_dir, peft = src
    out = tmp_path / "out"
    before = pyop.CALLS["count"]
    manifest = export(model_dir, out, {"plain": peft}, target="tensorrt", python_op=True, **FAST)
    assert pyop.CALLS["count"] > before, "validation must have run the Python op"
    assert manifest["validation"]["backend"].endswith("python RoutedLora")
    model = onnx.load(str(out / mf.DECODE_FILE))
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.op_type == rl.OP_TYPE]
    assert len(nodes) == manifest["base"]["num_layers"] * NUM_EXPERTS
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert nodes[0].domain == rl.DOMAIN and attrs["plugin_namespace"] == b"milora" and attrs["plugin_version"] == b"1"
    assert [f.name for f in model.functions] == [rl.OP_TYPE]
    assert list(model.functions[0].input) == [i[0] for i in rl.SPEC["inputs"]]
    # The same graph through the function body (no Python op registered in these sessions).
    from milora.export.exporter import check

    assert check(out, decode_steps=2)["validation"]["backend"] == "onnxruntime"


def test_decode_graph_with_empty_past_equals_prefill(exported):
    """Past length 0 (the traced example had 2): the decode graph fed the prefill's gates
    reproduces the prefill graph's logits and KV on the same left-padded prompts."""
    out, manifest = exported
    rows = _rows(np.random.default_rng(7), ["gamma", None, "plain"], [4, 1, 6], steps=0)
    sess = sessions(out, manifest)
    res = run_graphs(out, manifest, rows, sess)
    banks = assemble_banks(out, manifest, default_slots(manifest))
    base = manifest["base"]
    mask = res["mask"]
    ids = np.zeros_like(mask)
    for i, r in enumerate(rows):
        ids[i, mask.shape[1] - len(r.prompt):] = r.prompt
    feeds = {mf.INPUT_IDS: ids, mf.ATTENTION_MASK: mask, mf.GATES: res["prefill"][mf.GATES],
             mf.TENANT_SLOTS: np.array([0 if r.tenant is None else manifest["tenants"][r.tenant]["slot"] for r in rows])}
    for i in range(base["num_layers"]):
        feeds[mf.past_key(i)] = feeds[mf.past_value(i)] = np.zeros((3, base["num_kv_heads"], 0, base["head_dim"]),
                                                                   np.float32)
    feeds.update({n: banks[n] for n in mf.bank_names("decode")})
    logits, key0 = sess["decode"].run([mf.LOGITS, mf.present_key(0)], feeds)
    real = mask.astype(bool)
    # The prefill graph's logits are the last position's, every row's last real token.
    assert res["prefill"][mf.LOGITS].shape == (3, 1, base["vocab_size"])
    np.testing.assert_allclose(logits[:, -1], res["prefill"][mf.LOGITS][:, 0], **close("runtime", "logits"))
    np.testing.assert_allclose(key0.transpose(0, 2, 1, 3)[real], res["prefill"][mf.present_key(0)].transpose(0, 2, 1, 3)[real],
                               **close("runtime", "present"))


def test_qwen2_with_qkv_bias_exports_and_validates(tmp_path):
    from helpers import tenant, tiny_qwen2

    model_dir = tmp_path / "qwen"
    tiny_qwen2(0).save_pretrained(str(model_dir))
    tenant(3, builder=tiny_qwen2, config=TENANTS["beta"]).save_adapter(model_dir)  # root adapter: "default"
    manifest = export(model_dir, tmp_path / "out", **FAST)
    assert list(manifest["tenants"]) == ["default"] and manifest["base"]["architecture"] == "Qwen2ForCausalLM"
    assert manifest["validation"]["compared_selections"] > 0


def test_tensorrt_target_fp16_function_body_validates(src, tmp_path):
    """The plugin-node graph in fp16: onnxruntime runs the function body (CastLike of the
    float32 gates to fp16) and the result matches the fp16 reference."""
    model_dir, _ = src
    manifest = export(model_dir, tmp_path / "out", target="tensorrt", dtype="fp16", **FAST)
    assert manifest["lora_lowering"] == "plugin" and manifest["validation"]["compared_selections"] > 0


def test_prefill_logits_all_positions_option(src, exported, tmp_path):
    """--prefill-logits all keeps [B,T,V]: validated at every real position, and its last
    position equals the default graph's [B,1,V] logits on the same left-padded batch."""
    model_dir, peft = src
    out_last, manifest_last = exported
    out = tmp_path / "out"
    manifest = export(model_dir, out, {"plain": peft}, prefill_logits="all", **FAST)
    spec = manifest["graphs"]["prefill"]
    assert spec["logits_positions"] == mf.LOGITS_ALL
    assert spec["outputs"][0]["shape"] == [mf.AXIS_BATCH, mf.AXIS_SEQ, manifest["base"]["vocab_size"]]
    rows = _rows(np.random.default_rng(3), ["alpha", None, "plain"], [5, 1, 3], steps=0)
    full = run_graphs(out, manifest, rows, sessions(out, manifest))["prefill"][mf.LOGITS]
    last = run_graphs(out_last, manifest_last, rows, sessions(out_last, manifest_last))["prefill"][mf.LOGITS]
    assert full.shape == (3, 5, manifest["base"]["vocab_size"]) and last.shape == (3, 1, full.shape[2])
    np.testing.assert_allclose(full[:, -1:], last, **close("runtime", "logits"))
    with pytest.raises(ExportError, match="prefill-logits"):
        export(model_dir, tmp_path / "bad", prefill_logits="first", **FAST)


def test_graphs_share_one_weights_file(exported):
    """Both graphs point every external initializer into manifest.WEIGHTS_FILE, where each
    base weight is stored once: the decode graph's tensors are byte ranges the prefill graph
    also uses (its folded weights have other names), and the file holds nothing else."""
    out, manifest = exported
    assert sorted(p.name for p in out.glob("*.data")) == [mf.WEIGHTS_FILE]
    tables = {}
    for graph, spec in manifest["graphs"].items():
        assert spec["data_file"] == mf.WEIGHTS_FILE
        model = onnx.load(str(out / spec["file"]), load_external_data=False)
        external = {}
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                assert info["location"] == mf.WEIGHTS_FILE
                external[t.name] = (int(info["offset"]), int(info["length"]))
        tables[graph] = {n: (v["offset"], v["length"]) for n, v in spec["external_initializers"].items()}
        assert external == tables[graph]
    prefill, decode = (set(t.values()) for t in (tables["prefill"], tables["decode"]))
    assert decode and decode <= prefill
    ranges = sorted(prefill | decode)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), "overlapping tensors"
    size = (out / mf.WEIGHTS_FILE).stat().st_size
    assert size == ranges[-1][0] + ranges[-1][1]
    assert size < sum(n for _, n in ranges) + 64 * len(ranges)  # stored once; only alignment padding
