"""The export-side model: a LLaMA-family decoder over the Hugging Face base weights that takes
the adapter banks as inputs, gathers each row's tenant by slot and routes per row with the
tenant's options as data. Traced by torch.onnx into the prefill and decode graphs.

Shape legend: B batch, T new tokens, P past, K = P + T key positions, L layers, E = 7,
S slots, R max rank, d hidden, H / Hkv heads, D head dim.

It reuses the HF modules for embeddings, norms and linears (so weights and biases are the
base's own) and writes attention, rotary and masking itself: HF's mask code does not trace
cleanly, and the graph needs the LoRA op between each base linear and its consumer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milora.format.contract import EXPERTS
from milora.errors import UnsupportedModelError
from milora.format import manifest as mf
from milora.export.routed_lora import RoutedLoraOp
from milora.export.router_graph import route_layer
from milora.model.inject import KNOWN_ARCHITECTURES, base_info, decoder_layers


def check_supported(model: nn.Module) -> None:
    """Refuse architectures whose maths this module does not reproduce."""
    cfg = model.config
    decoder_layers(model)  # raises UnsupportedModelError on another layout
    arch = base_info(model)["architecture"]
    problems = []
    if arch not in KNOWN_ARCHITECTURES:
        problems.append(f"architecture {arch}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (expected 'silu')")
    if getattr(cfg, "use_sliding_window", False):
        problems.append("a sliding attention window")
    rot = getattr(model.model, "rotary_emb", None)
    if not hasattr(rot, "inv_freq"):
        problems.append("no rotary embedding at model.model.rotary_emb")
    elif "dynamic" in str(getattr(rot, "rope_type", "default")):
        # Frequencies that change with the sequence length cannot be frozen into the graph.
        problems.append(f"rope_type={rot.rope_type!r}")
    if problems:
        raise UnsupportedModelError(
            f"milora-export cannot export this model: {', '.join(problems)}. Supported: "
            f"{', '.join(KNOWN_ARCHITECTURES)} with SiLU MLPs, rotary positions and full attention")


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class BankModel(nn.Module):
    """prefill(ids, mask, slots, *banks) and decode(ids, mask, *past, slots, gates, *lora_banks)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        check_supported(hf_model)
        self.hf = hf_model
        self.base = base_info(hf_model)
        self.layers = decoder_layers(hf_model)
        rot = hf_model.model.rotary_emb
        self.register_buffer("inv_freq", rot.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        self.dtype = next(hf_model.parameters()).dtype

    # ---- pieces ----

    def positions(self, mask: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """cos, sin [B, 1, T, D] and allowed [B, 1, T, K] from the mask [B, K] (left padding).

            pos  = cumsum(mask) - 1, clamped at 0, last T columns   (as the reference)
            allowed[b, i, j] = j <= K - T + i  and  mask[b, j] == 1
        """
        k_len = mask.shape[1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, k_len - t:]  # [B, T]
        freqs = pos.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        cos = (emb.cos() * self.rope_scale).to(self.dtype)[:, None]
        sin = (emb.sin() * self.rope_scale).to(self.dtype)[:, None]
        q_idx = torch.arange(t, device=mask.device)[:, None] + (k_len - t)  # [T, 1]
        k_idx = torch.arange(k_len, device=mask.device)[None, :]  # [1, K]
        allowed = (k_idx <= q_idx)[None] & mask.bool()[:, None, :]  # [B, T, K]
        return cos, sin, allowed[:, None]

    def lora(self, l: int, m: str, x: Tensor, base_out: Tensor, banks: dict, slots: Tensor, gates_l: Tensor) -> Tensor:
        e = EXPERTS.index(m)
        return RoutedLoraOp.apply(x, base_out, banks[mf.lora_a_bank(m)], banks[mf.lora_b_bank(m)], slots, gates_l,
                                  l, e)

    def attention(self, l, h, rope, allowed, past, banks, slots, gates_l):
        """Self-attention of layer l with the routed LoRA on q, k, v (before rotary) and o.
        Returns (output [B, T, d], present key, present value [B, Hkv, K, D])."""
        attn = self.layers[l].self_attn
        b, t, _ = h.shape
        hd, nh, nkv = self.base["head_dim"], self.base["num_heads"], self.base["num_kv_heads"]
        proj = {m: self.lora(l, m, h, getattr(attn, m)(h), banks, slots, gates_l) for m in EXPERTS[:3]}
        q = proj["q_proj"].view(b, t, nh, hd).transpose(1, 2)  # [B, H, T, D]
        k = proj["k_proj"].view(b, t, nkv, hd).transpose(1, 2)  # [B, Hkv, T, D]
        v = proj["v_proj"].view(b, t, nkv, hd).transpose(1, 2)
        cos, sin = rope
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)  # [B, Hkv, K, D]
        rep = nh // nkv
        kk = k[:, :, None].expand(b, nkv, rep, k.shape[2], hd).reshape(b, nh, k.shape[2], hd)  # [B, H, K, D]
        vv = v[:, :, None].expand(b, nkv, rep, v.shape[2], hd).reshape(b, nh, v.shape[2], hd)
        scores = (q @ kk.transpose(2, 3)) * (hd ** -0.5)  # [B, H, T, K]
        # A fully masked row (a left-padding query) gets a uniform softmax, not NaN.
        scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ vv).transpose(1, 2).reshape(b, t, nh * hd)  # [B, T, H*D]
        return self.lora(l, "o_proj", out, attn.o_proj(out), banks, slots, gates_l), k, v

    def mlp(self, l, h, banks, slots, gates_l):
        mlp = self.layers[l].mlp
        g = self.lora(l, "gate_proj", h, mlp.gate_proj(h), banks, slots, gates_l)
        u = self.lora(l, "up_proj", h, mlp.up_proj(h), banks, slots, gates_l)
        a = F.silu(g) * u
        return self.lora(l, "down_proj", a, mlp.down_proj(a), banks, slots, gates_l)

    def run(self, ids, mask, past, slots, gates, banks, last_only: bool = False):
        """Shared body. gates is None in prefill (routers run per layer) or [B, L, E] in decode.
        last_only: logits of the last position only ([B, 1, V]); with left padding that is
        every row's last real token, and it spares the LM head over the rest of the prompt."""
        h = self.hf.model.embed_tokens(ids)  # [B, T, d]
        cos, sin, allowed = self.positions(mask, ids.shape[1])
        presents, layer_gates = [], []
        for l, layer in enumerate(self.layers):
            if gates is None:
                gates_l = route_layer(h, mask.bool(), slots, banks, l)  # [B, E] float32
                layer_gates.append(gates_l)
            else:
                gates_l = gates[:, l]  # [B, E]
            a, k, v = self.attention(l, layer.input_layernorm(h), (cos, sin), allowed,
                                     None if past is None else past[l], banks, slots, gates_l)
            h = h + a
            h = h + self.mlp(l, layer.post_attention_layernorm(h), banks, slots, gates_l)
            presents += [k, v]
        if last_only:
            h = h[:, -1:]  # [B, 1, d]
        logits = self.hf.lm_head(self.hf.model.norm(h))  # [B, T or 1, V]
        return logits, presents, (torch.stack(layer_gates, dim=1) if gates is None else None)


class PrefillGraph(nn.Module):
    def __init__(self, core: BankModel, logits_positions: str = mf.LOGITS_LAST):
        super().__init__()
        self.core = core
        self.bank_names = mf.bank_names("prefill")
        self.last_only = logits_positions == mf.LOGITS_LAST

    def forward(self, input_ids, attention_mask, tenant_slots, *banks):
        logits, presents, gates = self.core.run(input_ids, attention_mask, None, tenant_slots, None,
                                                dict(zip(self.bank_names, banks)), last_only=self.last_only)
        return (logits, *presents, gates)


class DecodeGraph(nn.Module):
    def __init__(self, core: BankModel):
        super().__init__()
        self.core = core
        self.bank_names = mf.bank_names("decode")
        self.n = core.base["num_layers"]

    def forward(self, input_ids, attention_mask, *rest):
        flat, (slots, gates), banks = rest[: 2 * self.n], rest[2 * self.n: 2 * self.n + 2], rest[2 * self.n + 2:]
        past = [(flat[2 * i], flat[2 * i + 1]) for i in range(self.n)]
        logits, presents, _ = self.core.run(input_ids, attention_mask, past, slots, gates,
                                            dict(zip(self.bank_names, banks)))
        return (logits, *presents)
