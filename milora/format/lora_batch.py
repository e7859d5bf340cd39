"""Per-batch LoRA inputs of the fused decode graph (numpy; the runtime and the validator build
them): routing is fixed after prefill, so which rows use which module in which layer is known
when the batch's membership changes, and the decode graph takes, per layer and module group,
only those rows and their (gated) adapter weights instead of gathering from the banks and
branching on gates at every step.

Shape legend: B running rows, L layers, R the export's max rank, n rows using a group in a
layer, r = R x (the most modules of the group one row uses there), d_in / d_out of the group.

Groups (manifest.LORA_GROUPS) are the places the fused graph adds a LoRA update (its projections are packed):
    qkv      q_proj, k_proj, v_proj on the attention input; output [q | k | v]
    o        o_proj on the attention output
    gate_up  gate_proj, up_proj on the MLP input; output [gate | up]
    down     down_proj on the MLP activation

Per layer l and group g (inputs lora.{l}.{g}.rows / .A / .B of the decode graph):
    rows [n, 1] int64  rows b with gates[b, l, m] != 0 for some module m of g (NaN counts: a
                       corrupt row stays visible in its own output)
    A    [n, d_in, r]  row i's j-th selected module m: A[i, :, jR:(j+1)R] = lora_A[m][slot, l]
    B    [n, r, d_out] B[i, jR:(j+1)R, cols of m] = gate[b, l, m] * lora_B[m][slot, l]
and the graph computes  y[rows] += (x[rows] @ A) @ B, which is
    sum over selected m of  gate * (x @ lora_A[m]) @ lora_B[m]  in m's columns:
exactly the routed LoRA op. Rows that use no module of g cost nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from milora.format import buffers
from milora.format import manifest as mf
from milora.format.contract import EXPERT_INDEX, NUM_EXPERTS

def build(banks: dict[str, np.ndarray], slots: np.ndarray, gates: np.ndarray, base: dict[str, Any],
          max_rank: int, dtype: str) -> dict[str, np.ndarray]:
    """Every lora.{l}.{g}.* input for rows with these slots [B] and gates [B, L, 7] (see the
    module docstring); banks [S, ...] as the runtime holds them."""
    layout = mf.lora_group_layout(base)
    np_dtype = np.dtype(mf.NP_DTYPES[dtype])
    r_max = max_rank
    out: dict[str, np.ndarray] = {}
    used = gates != 0  # [B, L, 7]; NaN != 0
    for l in range(base["num_layers"]):
        for g, modules in mf.LORA_GROUPS:
            d_in, d_out, cols = layout[g]
            picks = [[m for m in modules if used[b, l, EXPERT_INDEX[m]]] for b in range(len(slots))]
            rows = [b for b, p in enumerate(picks) if p]
            rank = r_max * max((len(picks[b]) for b in rows), default=0)
            a = buffers.zeros((len(rows), d_in, rank), np_dtype)  # read in place by onnxruntime
            bb = buffers.zeros((len(rows), rank, d_out), np_dtype)
            for i, b in enumerate(rows):
                s = int(slots[b])
                for j, m in enumerate(picks[b]):
                    first, width = cols[m]
                    a[i, :, j * r_max:(j + 1) * r_max] = banks[mf.lora_a_bank(m)][s, l]
                    bb[i, j * r_max:(j + 1) * r_max, first:first + width] = \
                        gates[b, l, EXPERT_INDEX[m]] * banks[mf.lora_b_bank(m)][s, l]
            names = mf.lora_inputs(l, g)
            out[names[0]], out[names[1]], out[names[2]] = np.asarray(rows, np.int64).reshape(-1, 1), a, bb
    return out


def empty(base: dict[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """Every lora.{l}.{g}.* input with no rows: what a prefill feeds (the graph builds its own).
    build() for a batch of no rows (it reads no bank then)."""
    no_rows = np.zeros((0, base["num_layers"], NUM_EXPERTS), np.float32)
    return build({}, np.zeros(0, np.int64), no_rows, base, 0, dtype)
