"""What the graphs require of padding (docs/export.md, "Padding"): masked positions do not
matter. Any pad id in [0, V) gives exactly the same logits, gates and real-position KV (the
validator pads with 0, the runtime with the tokenizer's pad id), and any finite values in
masked past KV positions give exactly the same decode logits."""

from __future__ import annotations

import numpy as np
import pytest

from export_helpers import make_model_dir
from milora.format.config import MiloraConfig

# Poolers that read every position (max, mean) would show a pad leaking into routing.
TENANTS = {"a": MiloraConfig(rank=2, alpha=4, top_k=2, pooler="max"),
           "b": MiloraConfig(rank=2, alpha=4, pooler="mean", activation_position="pre_pool")}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11]]
WIDTH = 5


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    import onnxruntime as ort

    from milora.format.pack import assemble_banks, default_slots
    from milora.export.exporter import export
    from milora.format.manifest import read_manifest

    root = tmp_path_factory.mktemp("pad")
    export(make_model_dir(root, TENANTS), root / "out", validate=False, progress=False)
    m = read_manifest(root / "out")
    banks = assemble_banks(root / "out", m, default_slots(m))
    sessions = {g: ort.InferenceSession(str(root / "out" / s["file"])) for g, s in m["graphs"].items()}

    def run(graph, values):
        spec = m["graphs"][graph]
        feeds = {i["name"]: values.get(i["name"], banks.get(i["name"])) for i in spec["inputs"]}
        names = [o["name"] for o in spec["outputs"]]
        return dict(zip(names, sessions[graph].run(names, feeds)))

    return m, run


def prefill(run, pad):
    ids = np.zeros((len(PROMPTS), WIDTH), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(PROMPTS):
        ids[row, WIDTH - len(p):], mask[row, WIDTH - len(p):] = p, 1
        ids[row, :WIDTH - len(p)] = pad(WIDTH - len(p))
    return run("prefill", {"input_ids": ids, "attention_mask": mask, "tenant_slots": np.array([1, 2])}), mask


def test_any_pad_id_in_the_vocabulary_gives_the_same_outputs(graphs):
    m, run = graphs
    vocab = m["base"]["vocab_size"]
    rng = np.random.default_rng(0)
    zero, mask = prefill(run, lambda n: 0)
    for pad in (lambda n: vocab - 1, lambda n: rng.integers(0, vocab, n)):
        other, _ = prefill(run, pad)
        for name, value in zero.items():
            if name.startswith("present."):  # real positions only: padded ones hold the pad's own KV
                real = mask.astype(bool)[:, None, :, None]
                assert np.array_equal(np.where(real, value, 0), np.where(real, other[name], 0)), name
            else:
                assert np.array_equal(value, other[name]), name


def test_finite_values_at_masked_past_positions_do_not_matter(graphs):
    m, run = graphs
    first, mask = prefill(run, lambda n: 0)

    def decode(fill):
        values = {"input_ids": np.array([[3], [4]]), "tenant_slots": np.array([1, 2]), "gates": first["gates"],
                  "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)}
        for i in range(m["base"]["num_layers"]):
            for kind in ("key", "value"):
                past = first[f"present.{i}.{kind}"].copy()  # [B, Hkv, P, D]
                past.transpose(0, 2, 1, 3)[~mask.astype(bool)] = fill  # every masked (row, position)
                values[f"past_key_values.{i}.{kind}"] = past
        return run("decode", values)["logits"]

    assert not mask.all()  # row 1 is left-padded
    assert np.array_equal(decode(0.0), decode(123.0))
