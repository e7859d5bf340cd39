"""Fuzzing the loaders (hypothesis, bounded: a few seconds in all): random bytes, truncated
and bit-flipped files, random JSON and valid documents with one part replaced must load or
fail with one of milora's typed errors (MiloraError), never anything else.

    manifest.json            milora.format.manifest.read_manifest
    OUT_DIR JSON readers     milora.runtime.bundle.Bundle.open (tokenizer_config.json,
                             generation_config.json, tokenizer.json) and its chat template
    slot packs               milora.format.pack.load_pack
    adapter directories      milora.format.adapter.read_config / read_adapter
    --batch requests         milora.runtime.cli.read_batch
    training JSONL           milora.train.data.read_jsonl
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milora.format.adapter import expected_shapes, read_adapter
from milora.format.contract import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, EXPERTS
from milora.errors import MiloraError
from milora.format import manifest as mf
from milora.format.pack import empty_pack, load_pack, tenant_options
from milora.format.config import MiloraConfig

# Bounded and reproducible in the suite; MILORA_FUZZ_EXAMPLES=5000 runs a longer, random search.
_LONG = int(os.environ.get("MILORA_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_LONG or 60, deadline=None, derandomize=not _LONG, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

BASE = dict(architecture="LlamaForCausalLM", hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
            intermediate_size=12, vocab_size=20)
CONFIG = MiloraConfig(rank=2, alpha=4, top_k=2, noisy_gating=True)

scalars = (st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=True)
           | st.text(max_size=12))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=10)


@st.composite
def mutated(draw, doc):
    """doc with one value somewhere replaced by random JSON (or a key dropped)."""
    return mutate(doc, draw)


def mutate(doc, draw):
    doc = copy.deepcopy(doc)
    node = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return doc
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and draw(st.integers(0, 4)) == 0:
            del node[key]
        else:
            node[key] = draw(json_values)
        return doc


def expect_typed(call):
    """call() succeeds or raises a MiloraError; anything else fails the test."""
    try:
        return call()
    except MiloraError:
        return None


def documents(valid):
    """Random bytes, random JSON, the valid document mutated, or truncated."""
    text = json.dumps(valid)
    return st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        mutated(valid).map(lambda d: json.dumps(d).encode()),
        st.integers(0, len(text)).map(lambda n: text[:n].encode()),
    )


# ---- manifest.json and the other JSON files of an OUT_DIR ----

def valid_manifest() -> dict:
    base = dict(BASE, max_position_embeddings=64)
    graphs = {g: dict(file=f, data_file=mf.WEIGHTS_FILE, **mf.graph_io(g, base, 2, "float32"),
                      external_initializers={"w": {"offset": 0, "length": 16, "dtype": "float32", "shape": [4]}})
              for g, f in (("prefill", mf.PREFILL_FILE), ("decode", mf.DECODE_FILE))}
    return {"format": mf.MANIFEST_FORMAT, "format_version": mf.MANIFEST_VERSION, "tool_versions": {"milora": "0"},
            "base": base, "experts": list(EXPERTS), "dtype": "float32", "opset": 18, "target": "onnxruntime",
            "flavour": mf.FLAVOUR_PORTABLE,
            "lora_lowering": "if_compact", "max_rank": 2, "max_top_k": 2, "slots": 2,
            "option_columns": list(mf.OPTION_COLUMNS), "option_codes": {"pooler": mf.POOLER_CODES},
            "graphs": graphs, "banks": mf.bank_specs(base, 2, "float32"),
            "tenants": {"t": {"slot": 1, "pack": "adapters/t.safetensors", "kind": "milora", "source": "/a",
                              "options": tenant_options(CONFIG), "config": CONFIG.to_json_dict(BASE)}},
            "source": {"model_dir": "/m", "adapters": {"t": "/a"}}, "validation": None, "export_seconds": 1.0,
            "files": {"prefill.onnx": "0" * 64}}


MANIFEST = valid_manifest()


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    from runtime_helpers import add_word_tokenizer

    root = tmp_path_factory.mktemp("fuzz_out")
    (root / mf.MANIFEST_FILE).write_text(json.dumps(MANIFEST))
    add_word_tokenizer(root)
    return root


def test_valid_documents_load(out_dir, tmp_path):
    """The fuzzers start from documents that do load (else they would only test refusals)."""
    from milora.runtime.bundle import Bundle

    assert mf.read_manifest(out_dir)["slots"] == 2
    assert Bundle.open(out_dir, verify=False).pad_token_id == 0
    path = tmp_path / "p.safetensors"
    save_pack(path, empty_pack(BASE, 2, "float32"))
    assert set(load_pack(path, MANIFEST)) == set(MANIFEST["banks"])
    assert read_adapter(adapter_dir(tmp_path / "a"))[0] == CONFIG
    assert len(read_requests(tmp_path, [json.dumps(r) for r in REQUESTS])) == 2
    assert len(read_examples(tmp_path, [json.dumps(r) for r in EXAMPLES])) == 2


@FUZZ
@given(documents(MANIFEST))
def test_fuzz_read_manifest(out_dir, raw):
    (out_dir / mf.MANIFEST_FILE).write_bytes(raw)
    try:
        expect_typed(lambda: mf.read_manifest(out_dir))
    finally:
        (out_dir / mf.MANIFEST_FILE).write_text(json.dumps(MANIFEST))


TOKENIZER_CONFIG = {"eos_token": "w2", "pad_token": {"content": "w0"}, "bos_token": "w1",
                    "chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"}
TEMPLATES = st.sampled_from(["{{ messages[0].content }}", "{% for m in messages %}", "{{ 1 / 0 }}",
                             "{{ raise_exception('refused') }}", "{{ messages.x.y.z }}", "{{ ''.__class__ }}",
                             "{{ messages[5] }}", "{{ 'a' + 1 }}", "{{ messages | length }}{{ bos_token }}"]) | st.text(max_size=20)


@FUZZ
@given(documents(TOKENIZER_CONFIG), documents({"eos_token_id": [2], "pad_token_id": 0}), st.binary(max_size=40))
def test_fuzz_bundle_json_readers(out_dir, tok_cfg, gen_cfg, tokenizer_tail):
    from milora.runtime.bundle import Bundle

    (out_dir / "tokenizer_config.json").write_bytes(tok_cfg)
    (out_dir / "generation_config.json").write_bytes(gen_cfg)
    tokenizer = (out_dir / "tokenizer.json").read_bytes()
    if tokenizer_tail:  # a corrupt tokenizer.json, now and then
        (out_dir / "tokenizer.json").write_bytes(tokenizer[: len(tokenizer) // 2] + tokenizer_tail)
    try:
        bundle = expect_typed(lambda: Bundle.open(out_dir, verify=False))
        if bundle is not None:
            assert 0 <= bundle.pad_token_id < BASE["vocab_size"]
            assert all(0 <= e < BASE["vocab_size"] for e in bundle.eos_token_ids)
            if bundle.chat_template:
                expect_typed(lambda: bundle.apply_chat_template([{"role": "user", "content": "hi"}]))
    finally:
        (out_dir / "tokenizer.json").write_bytes(tokenizer)
        (out_dir / "generation_config.json").unlink()


@FUZZ
@given(TEMPLATES)
def test_fuzz_chat_template(out_dir, template):
    from milora.runtime.bundle import Bundle

    (out_dir / "tokenizer_config.json").write_text(json.dumps(dict(TOKENIZER_CONFIG, chat_template=template)))
    bundle = Bundle.open(out_dir, verify=False)
    if bundle.chat_template:
        text = expect_typed(lambda: bundle.apply_chat_template([{"role": "user", "content": "hi"}]))
        assert text is None or isinstance(text, str)


# ---- slot packs ----

def save_pack(path: Path, pack: dict) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in pack.items()}, str(path))


PACK_BYTES = None


def pack_bytes(tmp: Path) -> bytes:
    global PACK_BYTES
    if PACK_BYTES is None:
        save_pack(tmp / "valid.safetensors", empty_pack(BASE, 2, "float32"))
        PACK_BYTES = (tmp / "valid.safetensors").read_bytes()
    return PACK_BYTES


def _array(shape, dtype, fill):
    with np.errstate(invalid="ignore"):  # NaN / inf cast to an integer dtype: any value will do
        return np.full(shape, fill).astype(dtype)


random_arrays = st.builds(
    _array,
    st.lists(st.integers(0, 5), max_size=3), st.sampled_from(["float32", "float16", "int64", "float64", "uint8"]),
    st.sampled_from([0.0, 1.5, np.nan, np.inf, -np.inf]))


@FUZZ
@given(st.data())
def test_fuzz_load_pack(tmp_path_factory, data):
    tmp = tmp_path_factory.getbasetemp()
    path = tmp / "fuzz_pack.safetensors"
    valid = pack_bytes(tmp)
    kind = data.draw(st.sampled_from(["bytes", "truncated", "flipped", "tensors"]))
    if kind == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=400)))
    elif kind == "truncated":
        path.write_bytes(valid[: data.draw(st.integers(0, len(valid)))])
    elif kind == "flipped":
        raw = bytearray(valid)
        for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
            raw[at] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(raw))
    else:
        names = st.sampled_from(sorted(MANIFEST["banks"])) | st.text(min_size=1, max_size=6)
        tensors = data.draw(st.dictionaries(names, random_arrays, max_size=5))
        if data.draw(st.booleans()):  # the right tensors, one of them wrong
            tensors = {**empty_pack(BASE, 2, "float32"), **tensors}
        save_pack(path, tensors)
    expect_typed(lambda: load_pack(path, MANIFEST))


# ---- adapter directories ----

def adapter_dir(path: Path, config_raw: bytes | None = None, weights_raw: bytes | None = None) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG_FILE).write_bytes(config_raw if config_raw is not None
                                              else json.dumps(CONFIG.to_json_dict(BASE)).encode())
    if weights_raw is None:
        save_file({n: np.full(s, 0.5, np.float32) for n, s in expected_shapes(CONFIG, BASE).items()},
                  str(path / ADAPTER_WEIGHTS_FILE))
    else:
        (path / ADAPTER_WEIGHTS_FILE).write_bytes(weights_raw)
    return path


@FUZZ
@given(documents(CONFIG.to_json_dict(BASE)))
def test_fuzz_read_adapter_config(tmp_path_factory, raw):
    directory = adapter_dir(tmp_path_factory.getbasetemp() / "fuzz_adapter_cfg", config_raw=raw)
    expect_typed(lambda: read_adapter(directory))


@FUZZ
@given(st.data())
def test_fuzz_read_adapter_weights(tmp_path_factory, data):
    directory = adapter_dir(tmp_path_factory.getbasetemp() / "fuzz_adapter_w")
    valid = (directory / ADAPTER_WEIGHTS_FILE).read_bytes()
    kind = data.draw(st.sampled_from(["bytes", "truncated", "flipped"]))
    if kind == "bytes":
        raw = data.draw(st.binary(max_size=400))
    elif kind == "truncated":
        raw = valid[: data.draw(st.integers(0, len(valid)))]
    else:
        flipped = bytearray(valid)
        for at in data.draw(st.lists(st.integers(0, len(flipped) - 1), min_size=1, max_size=4)):
            flipped[at] ^= data.draw(st.integers(1, 255))
        raw = bytes(flipped)
    adapter_dir(directory, weights_raw=raw)
    expect_typed(lambda: read_adapter(directory))


# ---- JSONL: --batch requests and training data ----

REQUESTS = [{"tenant": "a", "prompt": "hi", "max_new_tokens": 3, "stop": ["x"], "id": 1},
            {"tenant": "b", "messages": [{"role": "user", "content": "yo"}], "temperature": 0.5, "seed": 3}]
EXAMPLES = [{"prompt": "2+3?", "response": "5", "choices": ["4", "5"], "answer_index": 1},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]


def jsonl_lines(valid: list[dict]):
    line = st.one_of(st.sampled_from(valid).flatmap(mutated).map(json.dumps),
                     json_values.map(json.dumps), st.text(max_size=30), st.sampled_from([json.dumps(v) for v in valid]))
    return st.lists(line, max_size=4) | st.binary(max_size=200)


def write_lines(path: Path, lines) -> Path:
    path.write_bytes(lines if isinstance(lines, bytes) else "\n".join(lines).encode("utf-8", "surrogatepass"))
    return path


def read_requests(tmp: Path, lines):
    from milora.runtime.cli import read_batch

    return read_batch(write_lines(tmp / "fuzz_requests.jsonl", lines))


def read_examples(tmp: Path, lines):
    from milora.train.data import read_jsonl

    return read_jsonl(write_lines(tmp / "fuzz_examples.jsonl", lines))


@FUZZ
@given(jsonl_lines(REQUESTS))
def test_fuzz_batch_requests(tmp_path_factory, lines):
    from milora.runtime.sampling import SamplingParams

    requests = expect_typed(lambda: read_requests(tmp_path_factory.getbasetemp(), lines))
    for r in requests or []:  # what the reader accepts, the engine can be given
        assert isinstance(r["tenant"], str)
        SamplingParams(**{k: (tuple(v) if k == "stop" and isinstance(v, list) else (v,) if k == "stop" else v)
                          for k, v in r.items() if k not in ("tenant", "prompt", "messages", "id")})


@FUZZ
@given(jsonl_lines(EXAMPLES))
def test_fuzz_training_jsonl(tmp_path_factory, lines):
    examples = expect_typed(lambda: read_examples(tmp_path_factory.getbasetemp(), lines))
    for e in examples or []:
        assert isinstance(e.prompt, str) and isinstance(e.response, str) and e.prompt and e.response
        assert all(isinstance(c, str) for c in e.choices)
        assert e.answer is None or isinstance(e.answer, str)
