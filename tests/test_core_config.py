"""MiloraConfig validation and its JSON form (adapter format v1)."""

from __future__ import annotations

import json

import pytest

from milora.format.contract import EXPERTS
from milora.errors import ConfigError
from milora.format.config import MiloraConfig

pytestmark = pytest.mark.core

# (option, invalid value, words the message must contain to say what is expected)
INVALID = [
    ("rank", 0, "positive integer"),
    ("rank", -3, "positive integer"),
    ("rank", 2.5, "positive integer"),
    ("rank", True, "positive integer"),
    ("alpha", 0, "positive"),
    ("alpha", float("inf"), "finite"),
    ("alpha", "8", "number"),
    ("top_k", 0, "1..7"),
    ("top_k", 8, "1..7"),
    ("top_k", 1.0, "integer"),
    ("target_modules", (), "non-empty"),
    ("target_modules", ("q_proj", "qkv_proj"), "q_proj, k_proj"),
    ("target_modules", ("q_proj", "q_proj"), "at most once"),
    ("routed", "yes", "bool"),
    ("noisy_gating", 1, "bool"),
    ("pooler", "cls", "attention, last, mean, max"),
    ("activation", "swish", "rational, gelu, relu, identity"),
    ("activation_position", "middle", "post_pool, pre_pool"),
    ("gate_mode", "softmax", "paper, renormalized"),
    ("lb_loss", "aux", "switch, cv2, none"),
    ("rational_init", "tanh", "gelu, relu"),
    ("rational_degrees", (5,), "(numerator, denominator)"),
    ("rational_degrees", ("a", "b"), "(numerator, denominator)"),
    ("rational_degrees", (4, 4), "(5, 4)"),
    ("rational_degrees", (0, 4), "degrees >= 1"),
    ("lb_coef", -0.1, ">= 0"),
    ("lb_coef", float("nan"), "finite"),
    ("dropout", 1.0, "[0, 1)"),
    ("dropout", "x", "[0, 1)"),
    ("notes", "hello", "dict"),
]


@pytest.mark.parametrize("option,value,expected", INVALID, ids=[f"{o}={v!r}" for o, v, _ in INVALID])
def test_invalid_option_names_option_value_and_expectation(option, value, expected):
    with pytest.raises(ConfigError) as info:
        MiloraConfig(**{option: value})
    msg = str(info.value)
    assert option in msg
    # The offending value (or, for a collection, its offending member) is quoted.
    shown = value[-1] if option == "target_modules" and value else value
    assert (repr(shown) in msg or str(shown) in msg), msg
    assert expected in msg, msg


def test_top_k_range_follows_target_modules():
    MiloraConfig(target_modules=("q_proj", "v_proj"), top_k=2)
    with pytest.raises(ConfigError, match=r"top_k=3.*1\.\.2"):
        MiloraConfig(target_modules=("q_proj", "v_proj"), top_k=3)


def test_target_modules_canonical_order_and_bare_string():
    cfg = MiloraConfig(target_modules=["down_proj", "q_proj", "k_proj"])
    assert cfg.target_modules == ("q_proj", "k_proj", "down_proj")  # expert order = EXPERTS order
    # A bare string is one module name, not a sequence of characters.
    assert MiloraConfig(target_modules="v_proj").target_modules == ("v_proj",)


def test_defaults_are_the_project_defaults():
    cfg = MiloraConfig()
    assert (cfg.pooler, cfg.activation, cfg.rational_degrees, cfg.rational_init) == ("attention", "rational", (5, 4), "gelu")
    assert (cfg.activation_position, cfg.gate_mode, cfg.top_k, cfg.lb_coef) == ("post_pool", "paper", 1, 1e-2)
    assert cfg.target_modules == EXPERTS
    assert cfg.scale == cfg.alpha / cfg.rank


BASE = {"architecture": "LlamaForCausalLM", "hidden_size": 32, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 8, "intermediate_size": 48, "vocab_size": 96}

ROUND_TRIP = [
    MiloraConfig(),
    MiloraConfig(rank=4, alpha=3, top_k=2, target_modules=("q_proj", "v_proj", "down_proj"), pooler="last",
                 activation="rational", rational_degrees=(6, 5), rational_init="relu",
                 activation_position="pre_pool", gate_mode="renormalized", lb_loss="cv2", lb_coef=0.1,
                 noisy_gating=True, dropout=0.05, notes={"source": "test"}),
    MiloraConfig(rank=8, alpha=16, activation="gelu", pooler="max", lb_loss="none"),
    MiloraConfig(rank=8, alpha=8, routed=False, target_modules=("q_proj", "k_proj"), activation="identity"),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_json_round_trip(cfg):
    text = json.dumps(cfg.to_json_dict(BASE))  # through real JSON text, as on disk
    data = json.loads(text)
    assert data["base"] == BASE
    back = MiloraConfig.from_json_dict(data)
    assert back == cfg
    assert back.to_json_dict(BASE) == data


def test_json_rejects_other_format_version_and_missing_keys():
    data = MiloraConfig().to_json_dict(BASE)
    with pytest.raises(ConfigError, match=r"format_version=2.*version 1"):
        MiloraConfig.from_json_dict({**data, "format_version": 2})
    del data["rank"]
    with pytest.raises(ConfigError, match="rank"):
        MiloraConfig.from_json_dict(data)


def test_json_invalid_value_is_validated():
    data = MiloraConfig().to_json_dict(BASE)
    with pytest.raises(ConfigError, match=r"pooler='cls'"):
        MiloraConfig.from_json_dict({**data, "pooler": "cls"})
