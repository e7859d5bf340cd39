"""Row isolation in the graphs: no value of one row may change another row.

A tenant whose banks hold NaN (or whose gate is NaN) sits in row 0 beside a healthy tenant in
row 1. Row 1's gates, logits and KV must be bit-identical to the same batch with a healthy
row 0, in every lowering, in prefill and decode; row 0's own outputs must show the NaN (a
corrupt tenant surfaces as an error in its own row, never as "LoRA off")."""

from __future__ import annotations

import numpy as np
import pytest

from export_helpers import TENANTS, make_model_dir
from milora.format import manifest as mf
from milora.format.pack import assemble_banks, default_slots
from milora.export.exporter import export

LOWERINGS = ["dense", "if_skip", "compact", "if_compact", "tensorrt"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("isolation"), {k: TENANTS[k] for k in ("alpha", "beta")})


@pytest.fixture(scope="module", params=LOWERINGS)
def exported(request, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"iso_{request.param}") / "out"
    options = {"target": "tensorrt"} if request.param == "tensorrt" else {"lora_lowering": request.param}
    manifest = export(model_dir, out, progress=False, decode_steps=1, **options)  # validated on export
    import onnxruntime as ort

    opts = ort.SessionOptions()
    sess = {g: ort.InferenceSession(str(out / manifest["graphs"][g]["file"]), opts,
                                    providers=["CPUExecutionProvider"]) for g in ("prefill", "decode")}
    return request.param, out, manifest, sess


def _run(sess, graph, feeds, banks):
    feeds = dict(feeds, **{n: banks[n] for n in mf.bank_names(graph)})
    names = [o.name for o in sess[graph].get_outputs()]
    return dict(zip(names, sess[graph].run(names, feeds)))


def _poison(banks, slot, names):
    out = {k: v.copy() for k, v in banks.items()}
    for n in names:
        out[n][slot] = np.nan
    return out


PROMPTS = np.array([[0, 0, 5, 17, 33, 8], [9, 41, 2, 77, 13, 60]], np.int64)  # row 0 left-padded
MASK = (np.arange(6)[None, :] >= np.array([[2], [0]])).astype(np.int64)


def _prefill(exported, banks):
    _, out, manifest, sess = exported
    slots = default_slots(manifest)
    feeds = {mf.INPUT_IDS: PROMPTS, mf.ATTENTION_MASK: MASK,
             mf.TENANT_SLOTS: np.array([slots.index("alpha"), slots.index("beta")], np.int64)}
    return _run(sess, "prefill", feeds, banks)


def _decode(exported, banks, prefill, gates):
    _, out, manifest, sess = exported
    slots = default_slots(manifest)
    nl = manifest["base"]["num_layers"]
    feeds = {mf.INPUT_IDS: np.array([[4], [5]], np.int64),
             mf.ATTENTION_MASK: np.concatenate([MASK, np.ones((2, 1), np.int64)], axis=1),
             mf.TENANT_SLOTS: np.array([slots.index("alpha"), slots.index("beta")], np.int64), mf.GATES: gates}
    for i in range(nl):
        feeds[mf.past_key(i)], feeds[mf.past_value(i)] = prefill[mf.present_key(i)], prefill[mf.present_value(i)]
    return _run(sess, "decode", feeds, banks)


def _assert_row1_identical(got, want, where):
    for name, value in want.items():
        assert np.array_equal(got[name][1], value[1]), f"{where}: row 1's {name} changed"


def _lora_banks():
    return [n for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
            for n in (mf.lora_a_bank(m), mf.lora_b_bank(m))]


def test_nan_banks_in_row0_leave_row1_bit_identical(exported):
    lowering, out, manifest, _ = exported
    clean = assemble_banks(out, manifest, default_slots(manifest))
    alpha = default_slots(manifest).index("alpha")
    poisoned = _poison(clean, alpha, _lora_banks() + [mf.ROUTER_WEIGHT, mf.ROUTER_POOLER])
    want_p, got_p = _prefill(exported, clean), _prefill(exported, poisoned)
    _assert_row1_identical(got_p, want_p, f"{lowering} prefill")
    assert np.isnan(got_p[mf.GATES][0]).any() and np.isnan(got_p[mf.LOGITS][0]).any(), \
        "row 0's corruption must show in its own outputs"
    # Decode with the poisoned banks and row 0's NaN gates from its own prefill.
    want_d = _decode(exported, clean, want_p, want_p[mf.GATES])
    got_d = _decode(exported, poisoned, got_p, got_p[mf.GATES])
    _assert_row1_identical(got_d, want_d, f"{lowering} decode")
    assert np.isnan(got_d[mf.LOGITS][0]).all()


def test_nan_gate_in_row0_is_not_read_as_off(exported):
    """Clean banks, but row 0's decode gates are NaN on every expert: row 1 is unchanged and
    row 0's logits are NaN (before the fix, the If lowerings read the NaN as "no row uses
    this module" and skipped LoRA for row 1 too)."""
    lowering, out, manifest, _ = exported
    banks = assemble_banks(out, manifest, default_slots(manifest))
    pre = _prefill(exported, banks)
    nan_gates = pre[mf.GATES].copy()
    nan_gates[0] = np.nan
    want, got = _decode(exported, banks, pre, pre[mf.GATES]), _decode(exported, banks, pre, nan_gates)
    _assert_row1_identical(got, want, f"{lowering} decode")
    assert np.isnan(got[mf.LOGITS][0]).all()


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """The fused flavour (head dim 16): prefill routes in the graph, decode takes per-batch LoRA."""
    root = tmp_path_factory.mktemp("iso_fused")
    model_dir = make_model_dir(root, {k: TENANTS[k] for k in ("alpha", "beta")}, hidden=64)
    out = root / "out"
    manifest = export(model_dir, out, progress=False, decode_steps=1)
    assert manifest["flavour"] == mf.FLAVOUR_FUSED
    return out, manifest


def _fused_run(out, manifest, banks):
    """Prefill rows [alpha, beta] right-padded (the graph routes and builds its LoRA rows), then
    one decode step through the runtime's own per-batch LoRA builder (format.feeds feeds both
    phases of the one graph as the runtime does): (prefill outputs, decode outputs)."""
    import onnxruntime as ort

    from milora.format import feeds as fd

    sess = ort.InferenceSession(str(out / manifest["graphs"]["prefill"]["file"]), providers=["CPUExecutionProvider"])
    slots = default_slots(manifest)
    tenant_slots = [slots.index("alpha"), slots.index("beta")]
    batch = fd.prefill_feeds(manifest, [[5, 17, 33, 8], [9, 41, 2, 77, 13, 60]], tenant_slots, banks, capacity=8)
    pre = fd.run(sess, batch.feeds)
    decoded = []
    for feeds in fd.decode_feeds(manifest, batch, pre, banks, 1, lambda s: [4, 5],
                                 lambda feeds: decoded.append(fd.run(sess, feeds)) or decoded[-1]):
        pass
    return pre, decoded[0]


def test_fused_flavour_keeps_a_poisoned_row_in_its_row(fused):
    """NaN in alpha's banks (LoRA and router): beta's gates, logits and KV are bit-identical in
    prefill (routed in the graph) and in decode (per-batch LoRA rows); alpha's own are NaN."""
    out, manifest = fused
    clean = assemble_banks(out, manifest, default_slots(manifest))
    alpha = default_slots(manifest).index("alpha")
    poisoned = _poison(clean, alpha, _lora_banks() + [mf.ROUTER_WEIGHT])
    (want_p, want_d), (got_p, got_d) = _fused_run(out, manifest, clean), _fused_run(out, manifest, poisoned)
    _assert_row1_identical(got_p, want_p, "fused prefill")
    _assert_row1_identical(got_d, want_d, "fused decode")
    assert np.isnan(got_p[mf.GATES][0]).any() and np.isnan(got_d[mf.LOGITS][0]).all()
