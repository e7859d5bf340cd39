"""The fused flavour's export-side model: the same decoder as BankModel, written with
onnxruntime's fused operators (fused_ops.py) and packed projections, traced into
prefill_fused / decode graphs that onnxruntime runs with few nodes and KV updated in place.

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

LoRA updates: prefill routes in the graph (routers per layer, as BankModel) and adds each
module's update with the routed LoRA op (lowered like the portable graphs); decode takes
per-batch inputs (format/lora_batch.py): y[rows] += (x[rows] @ A) @ B per layer and group
(rows_lora: 4 nodes). The prefill's packed q|k|v is split for the routed LoRA op of each
module and concatenated back (prefill runs once per prompt; decode is where nodes count).
Prompts are right-padded (row b's tokens first): GroupQueryAttention keeps per-row lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milora.errors import UnsupportedModelError
from milora.export.bank_model import BankModel
from milora.export.fused_ops import gqa, rms_norm, rows_lora, skip_rms_norm
from milora.export.routed_lora import RoutedLoraOp
from milora.export.router_graph import route_layer
from milora.format import manifest as mf
from milora.format.contract import EXPERT_INDEX

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

    def __init__(self, core: BankModel, max_positions: int | None = None):
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
        self.qkv_w, self.qkv_b, self.gate_up_w = nn.ParameterList(), [], nn.ParameterList()
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv_w.append(nn.Parameter(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                                           requires_grad=False))  # [H*D + 2*Hkv*D, d]
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            self.qkv_b.append(torch.cat(biases) if all(b is not None for b in biases) else None)
            self.gate_up_w.append(nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                                               requires_grad=False))  # [2I, d]
        self.layout = mf.lora_group_layout(self.base)

    def _split(self, y: Tensor, group: str) -> list[Tensor]:
        widths = [w for _, w in self.layout[group][2].values()]
        return list(torch.split(y, widths, dim=-1)) if len(widths) > 1 else [y]

    def run(self, ids: Tensor, seqlens_k: Tensor, total: Tensor, past: list[tuple[Tensor, Tensor]] | None,
            lora, last: Tensor | None = None):
        """lora(l, group, x, y, res) -> y (the group's packed projection of x) with layer l's LoRA
        update added; res is the hidden state entering layer l (what its router reads).
        past None: prefill (empty past).
        last [B] int: the positions whose logits are wanted (prefill: each row's last token)."""
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
            if past is None:
                b = ids.shape[0]
                empty = torch.zeros(b, nkv, 0, hd, dtype=res.dtype)
                pk, pv = empty, empty
            else:
                pk, pv = past[l]
            a, k_out, v_out = gqa(qkv, pk, pv, seqlens_k, total, self.cos_cache, self.sin_cache, nh, nkv, hd)
            presents += [k_out, v_out]
            o = lora(l, "o", a, layer.self_attn.o_proj(a), res)
            x, res = skip_rms_norm(res, o, ln2.weight, ln2.variance_epsilon)
            gate, up = torch.split(lora(l, "gate_up", x, x @ self.gate_up_w[l].t(), res),
                                   self.base["intermediate_size"], dim=-1)
            act = F.silu(gate) * up
            out = lora(l, "down", act, layer.mlp.down_proj(act), res)
        norm = self.core.hf.model.norm
        h, _ = skip_rms_norm(res, out, norm.weight, norm.variance_epsilon)  # [B, T, d]
        if last is not None:
            h = torch.gather(h, 1, last[:, None, None].expand(-1, 1, h.shape[2]))  # [B, 1, d]
        return self.core.hf.lm_head(h), presents


class FusedPrefillGraph(nn.Module):
    """(input_ids, attention_mask [right padding], tenant_slots, *banks) ->
    (logits [B, 1, V] at each row's last token, *present [B, Hkv, T, D], gates [B, L, 7])."""

    def __init__(self, fused: FusedCore):
        super().__init__()
        self.fused = fused
        self.bank_names = mf.bank_names("prefill")

    def forward(self, input_ids, attention_mask, tenant_slots, *banks):
        f, bank = self.fused, dict(zip(self.bank_names, banks))
        lengths = attention_mask.sum(-1)  # [B]
        seqlens_k = (lengths - 1).to(torch.int32)
        total = torch.tensor(input_ids.shape[1], dtype=torch.int32)
        mask = attention_mask.bool()
        layer_gates = []

        def lora(l, group, x, y, entering):
            if group == "qkv":  # the router of layer l reads the hidden state entering it
                layer_gates.append(route_layer(entering, mask, tenant_slots, bank, l))  # [B, 7]
            gates_l = layer_gates[l]
            parts = [RoutedLoraOp.apply(x, part, bank[mf.lora_a_bank(m)], bank[mf.lora_b_bank(m)], tenant_slots,
                                        gates_l, l, EXPERT_INDEX[m])
                     for m, part in zip(f.layout[group][2], f._split(y, group))]
            return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

        logits, presents = f.run(input_ids, seqlens_k, total, None, lora, last=lengths - 1)
        return (logits, *presents, torch.stack(layer_gates, dim=1))


class FusedDecodeGraph(nn.Module):
    """(input_ids [B, T], seqlens_k [B], total_sequence_length [], *past [B, Hkv, M, D],
    *lora inputs (rows, A, B per layer and group)) -> (logits [B, T, V], *present)."""

    def __init__(self, fused: FusedCore, lora: bool = True):
        super().__init__()
        self.fused = fused
        self.n = fused.base["num_layers"]
        self.with_lora = lora  # False: an export without tenants (no LoRA inputs at all)

    def forward(self, input_ids, seqlens_k, total, *rest):
        f, n = self.fused, self.n
        flat, lora_in = rest[: 2 * n], rest[2 * n:]
        past = [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]
        groups = {name: i for i, (name, _) in enumerate(mf.LORA_GROUPS)}

        def lora(l, group, x, y, entering):
            if not self.with_lora:
                return y
            i = 3 * (l * len(groups) + groups[group])
            rows, a, b = lora_in[i:i + 3]  # [n, 1], [n, d_in, r], [n, r, d_out]
            return rows_lora(y, x, rows, a, b)

        logits, presents = f.run(input_ids, seqlens_k, total, past, lora)
        return (logits, *presents)
