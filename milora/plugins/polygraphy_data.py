"""Polygraphy data loader for one graph of a milora export, written by milora-export as
OUT_DIR/polygraphy/<graph>_data.py (docs/tensorrt.md). Compare the backends on it:

    polygraphy run OUT_DIR/decode.onnx --onnxrt --trt \
        --data-loader-script OUT_DIR/polygraphy/decode_data.py \
        --trt-config-script OUT_DIR/polygraphy/decode_data.py:trt_config

Feeds (two iterations: a mixed batch, then one row):
  input_ids / attention_mask  the export's own tokenizer on short real texts, one row per tenant
                              and one base-model row (slot 0), left-padded; seeded random ids
                              when OUT_DIR has no readable tokenizer.json
  tenant_slots                the manifest's slots of those tenants
  banks                       filled from the slot packs (adapters/<tenant>.safetensors); slot 0 zero
  gates, past KV (decode)     from running prefill.onnx on the same prompts in onnxruntime, and
                              input_ids its greedy next tokens; synthetic (one expert per layer,
                              N(0, 1) KV) where onnxruntime is absent
Needs numpy and safetensors (tokenizers and onnxruntime when present). Importing it also
registers milora::RoutedLora with TensorRT when milora and TensorRT are installed, so that
polygraphy's --trt can parse the graph.
"""

import json
from pathlib import Path

import numpy as np

GRAPH = "prefill"  # milora-export writes each graph's name here
OUT = Path(__file__).resolve().parent.parent
TEXTS = ("The capital of France is", "def fibonacci(n):", "Question: what is 12 times 7? Answer:",
         "Once upon a time", "The quick brown fox", "Water boils at", "In 1969 the first", "Dear team,")
MAX_ROWS, MAX_TOKENS, SEED = 8, 12, 0
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}

try:  # TensorRT parses milora::RoutedLora only once the plugin is registered
    from milora.errors import DependencyError
    from milora.plugins.trt_plugin import register as _register

    try:
        _register()
    except DependencyError:
        pass
except ImportError:
    pass

_FEEDS = {}


def _manifest():
    return json.loads((OUT / "manifest.json").read_text())


def _prompts(m, rows):
    vocab = m["base"]["vocab_size"]
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(OUT / "tokenizer.json"))
        ids = [[t for t in tok.encode(TEXTS[i % len(TEXTS)], add_special_tokens=False).ids if 0 <= t < vocab]
               for i in range(rows)]
    except Exception:  # noqa: BLE001 - no tokenizer (or not one this loader can read): random ids
        ids = [[]] * rows
    rng = np.random.default_rng(SEED)
    return [(p or rng.integers(3, vocab, size=3 + i % 5).tolist())[:MAX_TOKENS] for i, p in enumerate(ids)]


def _banks(m):
    from safetensors.numpy import load_file

    banks = {n: np.zeros([m["slots"], *s["shape"]], DTYPES[s["dtype"]]) for n, s in m["banks"].items()}
    for info in m["tenants"].values():
        pack = load_file(str(OUT / info["pack"]))
        for name in banks:
            banks[name][info["slot"]] = pack[name]
    return banks


def _left_pad(prompts):
    # milora.format.padding.left_pad, spelled out: this script runs from OUT_DIR without milora
    t = max(len(p) for p in prompts)
    ids, mask = np.zeros((len(prompts), t), np.int64), np.zeros((len(prompts), t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
    return ids, mask


def _prefill_feed(m, banks, slots, prompts):
    ids, mask = _left_pad(prompts)
    feed = {"input_ids": ids, "attention_mask": mask, "tenant_slots": np.array(slots, np.int64)}
    return feed, {i["name"]: banks[i["name"]] for i in m["graphs"]["prefill"]["inputs"] if i["name"] in banks}


def _decode_feed(m, banks, slots, prompts):
    feed, bank_feed = _prefill_feed(m, banks, slots, prompts)
    b, p = feed["input_ids"].shape
    layers, hkv, hd = m["base"]["num_layers"], m["base"]["num_kv_heads"], m["base"]["head_dim"]
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(OUT / m["graphs"]["prefill"]["file"]), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, sess.run(names, {**feed, **bank_feed})))
        gates, next_ids = out["gates"], out["logits"][:, -1].argmax(-1)
        past = {f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(layers) for k in ("key", "value")}
    except ImportError:
        rng = np.random.default_rng(SEED)
        gates = np.zeros((b, layers, 7), np.float32)
        for row, slot in enumerate(slots):
            if slot:
                gates[row, np.arange(layers), (row + np.arange(layers)) % 7] = 1.0
        next_ids = feed["input_ids"][:, -1]
        past = {f"past_key_values.{i}.{k}": rng.standard_normal((b, hkv, p, hd)).astype(DTYPES[m["dtype"]])
                for i in range(layers) for k in ("key", "value")}
    feed = {"input_ids": next_ids.reshape(b, 1).astype(np.int64),
            "attention_mask": np.concatenate([feed["attention_mask"], np.ones((b, 1), np.int64)], axis=1),
            **past, "tenant_slots": feed["tenant_slots"], "gates": gates.astype(np.float32)}
    names = [i["name"] for i in m["graphs"]["decode"]["inputs"]]
    return {n: feed[n] if n in feed else banks[n] for n in names}


def feeds():
    """Every feed dict of this graph (computed once)."""
    if not _FEEDS:
        m = _manifest()
        banks = _banks(m)
        tenants = sorted(m["tenants"], key=lambda t: m["tenants"][t]["slot"])[:MAX_ROWS - 1]
        slots = [m["tenants"][t]["slot"] for t in tenants] + [0]
        prompts = _prompts(m, len(slots))
        make = _decode_feed if GRAPH == "decode" else \
            (lambda *a: {k: v for d in _prefill_feed(*a) for k, v in d.items()})
        _FEEDS["all"] = [make(m, banks, slots, prompts), make(m, banks, slots[:1], prompts[:1])]
    return _FEEDS["all"]


def load_data():
    """Polygraphy's data loader: yields the feed dicts."""
    yield from feeds()


def trt_config(builder, network):
    """Polygraphy's --trt-config-script: one optimization profile spanning the feeds' shapes."""
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    all_feeds = feeds()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        shapes = np.array([f[name].shape for f in all_feeds])
        profile.set_shape(name, tuple(shapes.min(0)), tuple(shapes[0]), tuple(shapes.max(0)))
    config.add_optimization_profile(profile)
    return config
