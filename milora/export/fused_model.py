"""The fused flavour's export-side model: the same decoder as BankModel, written with
onnxruntime's fused operators (fused_ops.py) and packed projections, traced into ONE graph
that serves both phases (so onnxruntime loads and prepacks the weights once), with few nodes
and KV updated in place (GroupQueryAttention writes straight into the If's output, the bound
buffer: branches.select_to_if).

Shape legend: B rows, T new tokens, M KV capacity, L layers, d hidden, D head dim, H / Hkv
heads, I intermediate size, n rows using a LoRA group, r its rank.

One layer (x = the normed residual stream; the residual itself is what the router reads):

    x, res  = skip_rms_norm(res, previous block's output, ln1)   (layer 0: rms_norm(embeddings))
    qkv     = x @ W_qkv [d, H*D + 2*Hkv*D]                        + LoRA update of q, k, v
    a, K, V = GroupQueryAttention(q, k, v, KV, seqlens_k, total, cos, sin)   (rotary inside)
    o       = a @ W_o                                             + LoRA update of o
    x, res  = skip_rms_norm(res, o, ln2)
    gu      = x @ W_gate_up [d, 2I]                               + LoRA update of gate, up
    out     = (silu(gate) * up) @ W_down                          + LoRA update of down

An export without tenants keeps gate and up apart (gate = x @ W_gate, up = x @ W_up): the same
weights read, and no Split, which costs onnxruntime more than a MatMul's dispatch (docs/export.md).

LoRA updates: y[rows] += (x[rows] @ A) @ B per layer and group (rows_lora: 4 nodes), A and
B holding the rows' selected modules with their gates folded in. The graph is one If on the
ROUTE input over two whole models that read the same weights (the main graph's initializers,
loaded and prepacked once):

    route (prefill)  each layer's routers run on the hidden state entering the layer (as
                     BankModel; skipped by an inner If when no row has a routed tenant, the
                     gates are then the slots' fixed gates), and rows / A / B are built from
                     the banks: rows that use a module of the group, A = the group's lora_A
                     side by side, B = the gated lora_B blocks in their output columns
    decode           rows / A / B are decode's lora.{l}.{g}.* inputs (format/lora_batch.py,
                     built once per batch by the runtime from the prefill's gates), read by
                     the branch from the outer scope (no copy); no If inside

so a decode step runs one If and no router, bank gather or per-layer branch (an If per layer
cost about 0.2 ms a step each on SmolLM2: docs/export.md), and a batch of base rows (no
routed tenant) runs no router in prefill either. Prompts are right-padded (row b's tokens first):
GroupQueryAttention keeps per-row lengths; a prefill writes the KV buffers from position 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milora.errors import UnsupportedModelError
from milora.export.bank_model import BankModel
from milora.export.fused_ops import gqa, rms_norm, rows_lora, select, skip_rms_norm
from milora.export.router_graph import route_layer
from milora.format import manifest as mf
from milora.format.contract import EXPERT_INDEX, NUM_EXPERTS

DEFAULT_MAX_POSITIONS = 4096  # rotary cache length when the config names none


def check_fusable(base: dict, dtype: str) -> list[str]:
    """Why this model cannot use the fused flavour (empty: it can)."""
    problems = []
    if base["head_dim"] % mf.FUSED_HEAD_DIM_MULTIPLE:
        problems.append(f"head_dim {base['head_dim']} is not a multiple of {mf.FUSED_HEAD_DIM_MULTIPLE} "
                        "(onnxruntime's GroupQueryAttention needs that)")
    if dtype != "float32":
        problems.append(f"dtype {dtype} (the fused flavour is float32; fp16 exports use the portable one)")
    return problems


class FusedCore(nn.Module):
    """Packed weights and the fused layer over a BankModel's HF modules (see the module docstring)."""

    def __init__(self, core: BankModel, max_positions: int | None = None, pack_gate_up: bool = True):
        super().__init__()
        problems = check_fusable(core.base, {torch.float32: "float32"}.get(core.dtype, str(core.dtype)))
        if problems:
            raise UnsupportedModelError(f"the fused flavour cannot export this model: {'; '.join(problems)}. "
                                        "Export with --flavour portable")
        self.core, self.base = core, core.base
        self.layers = core.layers
        pos = torch.arange(max_positions or DEFAULT_MAX_POSITIONS, dtype=torch.float32)[:, None] * core.inv_freq
        self.register_buffer("cos_cache", (pos.cos() * core.rope_scale).to(core.dtype), persistent=False)
        self.register_buffer("sin_cache", (pos.sin() * core.rope_scale).to(core.dtype), persistent=False)
        self.qkv_w, self.qkv_b, self.gate_up_w, self.gate_up_b = nn.ParameterList(), [], nn.ParameterList(), []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv_w.append(nn.Parameter(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                                           requires_grad=False))  # [H*D + 2*Hkv*D, d]
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            self.qkv_b.append(torch.cat(biases) if all(b is not None for b in biases) else None)
            if pack_gate_up:  # the LoRA group gate_up updates both at once
                self.gate_up_w.append(nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                                                   requires_grad=False))  # [2I, d]
                mlp_biases = [mlp.gate_proj.bias, mlp.up_proj.bias]
                self.gate_up_b.append(torch.cat(mlp_biases) if all(b is not None for b in mlp_biases) else None)
        self.layout = mf.lora_group_layout(self.base)

    def run(self, ids: Tensor, seqlens_k: Tensor, total: Tensor, past: list[tuple[Tensor, Tensor]], lora,
            index: Tensor):
        """lora(l, group, x, y, res) -> y (the group's packed projection of x) with layer l's LoRA
        update added; res is the hidden state entering layer l (what its router reads).
        past: the KV buffers per layer; index [B, P]: the positions whose logits are wanted."""
        nh, nkv, hd = self.base["num_heads"], self.base["num_kv_heads"], self.base["head_dim"]
        res = self.core.hf.model.embed_tokens(ids)  # [B, T, d]
        out, presents = None, []
        for l, layer in enumerate(self.layers):
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            if out is None:
                x = rms_norm(res, ln1.weight, ln1.variance_epsilon)
            else:
                x, res = skip_rms_norm(res, out, ln1.weight, ln1.variance_epsilon)
            qkv = x @ self.qkv_w[l].t()
            if self.qkv_b[l] is not None:
                qkv = qkv + self.qkv_b[l]
            qkv = lora(l, "qkv", x, qkv, res)
            pk, pv = past[l]
            a, k_out, v_out = gqa(qkv, pk, pv, seqlens_k, total, self.cos_cache, self.sin_cache, nh, nkv, hd)
            presents += [k_out, v_out]
            o = lora(l, "o", a, layer.self_attn.o_proj(a), res)
            x, res = skip_rms_norm(res, o, ln2.weight, ln2.variance_epsilon)
            if len(self.gate_up_w):
                gu = x @ self.gate_up_w[l].t()
                if self.gate_up_b[l] is not None:
                    gu = gu + self.gate_up_b[l]
                gate, up = torch.split(lora(l, "gate_up", x, gu, res), self.base["intermediate_size"], dim=-1)
            else:  # no tenants: no LoRA update to add
                gate, up = layer.mlp.gate_proj(x), layer.mlp.up_proj(x)
            act = F.silu(gate) * up
            out = lora(l, "down", act, layer.mlp.down_proj(act), res)
        norm = self.core.hf.model.norm
        h = torch.gather(res + out, 1, index[:, :, None].expand(-1, -1, res.shape[2]))  # [B, P, d]
        h = rms_norm(h, norm.weight, norm.variance_epsilon)
        return self.core.hf.lm_head(h), presents


def prefill_rows(gates: Tensor, slots: Tensor, banks: dict[str, Tensor], l: int, layout) -> list[Tensor]:
    """rows, A, B of each LoRA group of layer l (manifest.LORA_GROUPS order) from the layer's
    gates [B, 7]: the prefill's counterpart of format/lora_batch.build (every module of the
    group side by side, rank |g| x R, instead of only the selected ones)."""
    out = []
    for g, modules in mf.LORA_GROUPS:
        _, d_out, cols = layout[g]
        gm = gates[:, [EXPERT_INDEX[m] for m in modules]]  # [B, |g|]
        used = (gm != 0).to(gates.dtype).amax(-1) > 0  # NaN != 0: a corrupt row stays visible in its own output
        rows = torch.nonzero(used)  # [n, 1]
        r = rows[:, 0]
        s, gn = slots[r], gm[r]  # [n], [n, |g|]
        a = torch.cat([banks[mf.lora_a_bank(m)][s, l] for m in modules], dim=-1)  # [n, d_in, |g| R]
        blocks = []
        for j, m in enumerate(modules):
            first, width = cols[m]
            bm = gn[:, j, None, None].to(a.dtype) * banks[mf.lora_b_bank(m)][s, l]  # [n, R, width]
            blocks.append(F.pad(bm, (first, d_out - first - width)) if width != d_out else bm)
        out += [rows, a, torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]]  # B [n, |g| R, d_out]
    return out


class FusedGraph(nn.Module):
    """The fused flavour's graph (manifest._fused_io): (input_ids [B, T], seqlens_k [B],
    total_sequence_length [], logits_index [B, P], *past [B, Hkv, M, D], tenant_slots [B],
    route [], *banks, *lora inputs) -> (logits [B, P, V], *present, gates [B, L, 7],
    router_logits [B, L, 7]); gates and router logits are 0 in decode and for rows with no
    routed tenant. lora False (an export without tenants): the inputs end with the past."""

    def __init__(self, fused: FusedCore, lora: bool = True):
        super().__init__()
        self.fused = fused
        self.n = fused.base["num_layers"]
        self.with_lora = lora
        self.bank_names = mf.bank_names("prefill")

    def forward(self, input_ids, seqlens_k, total, logits_index, *rest):
        f, n = self.fused, self.n
        past = [(rest[2 * i], rest[2 * i + 1]) for i in range(n)]
        b = input_ids.shape[0]
        if not self.with_lora:
            logits, presents = f.run(input_ids, seqlens_k, total, past, lambda l, group, x, y, res: y, logits_index)
            none = torch.zeros(b, n, NUM_EXPERTS)
            return (logits, *presents, none, none)
        slots, route = rest[2 * n], rest[2 * n + 1]
        nb = len(self.bank_names)
        bank = dict(zip(self.bank_names, rest[2 * n + 2: 2 * n + 2 + nb]))
        given = rest[2 * n + 2 + nb:]
        groups = {name: i for i, (name, _) in enumerate(mf.LORA_GROUPS)}
        per_layer = 3 * len(groups)
        # A prefill's prompt tokens: right padding, seqlens_k[b] = row b's length - 1.
        mask = torch.arange(input_ids.shape[1])[None, :] <= seqlens_k[:, None].long()  # [B, T]
        routed = bank[mf.SLOT_OPTIONS][slots][:, mf.OPTION_COLUMNS.index("routed")] == 1  # [B]
        any_routed = routed.to(torch.float32).amax(0) > 0  # []
        state: dict[int, list[Tensor]] = {}

        def prefill_lora(l, group, x, y, entering):
            if group == "qkv":  # the layer's routers, then its rows (see the module docstring)
                fixed = bank[mf.SLOT_FIXED_GATES][slots]  # [B, 7]
                gates, z = select(any_routed, list(route_layer(entering, mask, slots, bank, l, with_logits=True)),
                                  [fixed, torch.zeros_like(fixed)])  # [B, 7] each
                state[l] = [gates, z, *prefill_rows(gates, slots, bank, l, f.layout)]
            i = 3 * groups[group]
            return rows_lora(y, x, *state[l][2 + i:2 + i + 3])

        def decode_lora(l, group, x, y, entering):
            i = l * per_layer + 3 * groups[group]
            return rows_lora(y, x, *given[i:i + 3])

        logits, presents = f.run(input_ids, seqlens_k, total, past, prefill_lora, logits_index)
        gates = torch.stack([state[l][0] for l in range(n)], dim=1)  # [B, L, 7]
        z = torch.stack([state[l][1] for l in range(n)], dim=1)
        d_logits, d_presents = f.run(input_ids, seqlens_k, total, past, decode_lora, logits_index)
        none = torch.zeros(b, n, NUM_EXPERTS)
        return tuple(select(route, [logits, *presents, gates, z], [d_logits, *d_presents, none, none]))
