"""The export's per-row router (one graph for every tenant's options, selected as data) against
the reference MiloraRouter, row by row, for every pooler, activation, position, gate mode and
k mixed in one batch. Both are built from the same definitions (milora.model.router); this
checks the per-row option plumbing: packing a tenant into banks and picking its variant."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from milora.format.adapter import expected_shapes
from milora.format.contract import EXPERT_INDEX
from milora.format import manifest as mf
from milora.format.pack import build_pack
from milora.export.router_graph import route_layer
from milora.format.config import MiloraConfig
from milora.model.router import MiloraRouter
from milora.format.tolerances import close

BASE = {"architecture": "LlamaForCausalLM", "hidden_size": 16, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "head_dim": 8, "intermediate_size": 24, "vocab_size": 50}


def _configs():
    for pooler, act, pos, mode, k in itertools.product(("attention", "last", "mean", "max"),
                                                       ("rational", "gelu", "relu", "identity"),
                                                       ("post_pool", "pre_pool"), ("paper", "renormalized"), (1, 3)):
        yield MiloraConfig(rank=2, alpha=2, top_k=k, pooler=pooler, activation=act,
                           activation_position=pos, gate_mode=mode,
                           target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))


def test_route_layer_equals_reference_router_per_row():
    torch.manual_seed(0)
    configs = list(_configs())  # 128 option combinations, one row each
    routers, packs = [], []
    for i, cfg in enumerate(configs):
        r = MiloraRouter(BASE["hidden_size"], cfg).eval()
        with torch.no_grad():
            r.weight.normal_(0, 2.0)
            if r.pooler is not None:
                r.pooler.normal_(0, 1.0)
        routers.append(r)
        tensors = {n: np.zeros(shape, np.float32) for n, shape in expected_shapes(cfg, BASE).items()
                   if ".lora_" in n}
        for l in range(BASE["num_layers"]):
            for part, value in (("weight", r.weight), ("pooler", r.pooler), ("act_num", r.act_num), ("act_den", r.act_den)):
                if value is not None:
                    tensors[f"layers.{l}.router.{part}"] = value.detach().numpy()
        packs.append(build_pack(cfg, tensors, BASE, 2, "float32"))
    banks = {n: torch.from_numpy(np.stack([np.zeros_like(packs[0][n]), *[p[n] for p in packs]]))
             for n in mf.bank_specs(BASE, 2, "float32")}
    b, t = len(configs), 5
    hidden = torch.randn(b, t, BASE["hidden_size"]) * 3
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[::3, :2] = False  # left padding on some rows
    slots = torch.arange(1, b + 1)
    for l in range(BASE["num_layers"]):
        got = route_layer(hidden, mask, slots, banks, l)  # [B, 7]
        for i, (cfg, r) in enumerate(zip(configs, routers)):
            want, _, logits = r(hidden[i:i + 1], mask[i:i + 1])  # [1, E] over the tenant's experts
            cols = [EXPERT_INDEX[m] for m in cfg.target_modules]
            label = f"row {i}: {cfg.pooler}/{cfg.activation}/{cfg.activation_position}/{cfg.gate_mode}/k={cfg.top_k}"
            assert torch.equal(got[i, cols] != 0, want[0] != 0), label
            torch.testing.assert_close(got[i, cols], want[0], **close("torch", "gates"), msg=label)
            assert (got[i, [c for c in range(7) if c not in cols]] == 0).all(), label
