"""onnxruntime's fused operators as traceable PyTorch ops, for the fused graph flavour.

Each op runs its maths eagerly in PyTorch (so the fused model can be checked against the
reference before any graph exists) and traces, through torch.onnx (dynamo=False), to one
onnxruntime operator:

    rms_norm(x, g)             SimplifiedLayerNormalization          y = x / sqrt(mean(x^2) + eps) * g
    skip_rms_norm(x, s, g)     com.microsoft.SkipSimplifiedLayerNormalization
                               -> (rms_norm(x + s, g), x + s)
    gqa(q, k, v, pk, pv, ...)  com.microsoft.GroupQueryAttention (rotary inside, KV per row)
    rows_lora(y, x, r, A, B)   GatherND, MatMul, MatMul, ScatterND(reduction="add"):
                               y[r[i]] += (x[r[i]] @ A[i]) @ B[i]

Shape legend: B rows, S new tokens, H / Hkv heads, D head dim, M KV capacity, n selected rows.

GroupQueryAttention, as onnxruntime defines it (the semantics the eager code reproduces):
    seqlens_k[b] = (tokens of row b after this call) - 1;  total = max over rows of those + 1
    prompt (S == total):  positions 0..S-1, row b's real tokens are 0..seqlens_k[b] (right
        padding); with no past, present = the new K/V [B, Hkv, S, D]; with a buffer
        [B, Hkv, M, D], the S new K/V are written into it at 0..S-1 (present is the buffer)
    otherwise, past [B, Hkv, M, D] (shared buffer, M >= every row's total): the S new tokens of row b
        sit at positions p_b .. p_b+S-1, p_b = seqlens_k[b] + 1 - S; they are written into the
        buffer there (present is the buffer) and attend to keys 0 .. their own position
    rotary (rotate-half convention) on q and k with cos/sin caches [max_pos, D/2] at those
    positions; scale 1/sqrt(D); onnxruntime requires D % 16 == 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rms(x: Tensor, gamma: Tensor, eps: float) -> Tensor:
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * gamma


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, eps: float):  # noqa: D102
        return _rms(x, gamma, eps)

    @staticmethod
    def symbolic(g, x, gamma, eps: float):  # noqa: D102
        return g.op("SimplifiedLayerNormalization", x, gamma, epsilon_f=eps, axis_i=-1,
                    stash_type_i=1).setType(x.type())


class _SkipRmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, skip, gamma, eps: float):  # noqa: D102
        h = x + skip
        return _rms(h, gamma, eps), h

    @staticmethod
    def symbolic(g, x, skip, gamma, eps: float):  # noqa: D102
        out, _, _, total = g.op("com.microsoft::SkipSimplifiedLayerNormalization", x, skip, gamma, epsilon_f=eps,
                                outputs=4)
        return out.setType(x.type()), total.setType(x.type())


def rms_norm(x: Tensor, gamma: Tensor, eps: float) -> Tensor:
    return _RmsNorm.apply(x, gamma, eps)


def skip_rms_norm(x: Tensor, skip: Tensor, gamma: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + skip), x + skip): the residual sum comes out with the norm."""
    return _SkipRmsNorm.apply(x, skip, gamma, eps)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, h, S, D], pos [B, S] -> x rotated at pos (caches [max_pos, D/2])."""
    c = torch.cat((cos[pos], cos[pos]), -1)[:, None]  # [B, 1, S, D]
    s = torch.cat((sin[pos], sin[pos]), -1)[:, None]
    return (x * c + _rotate_half(x) * s).to(x.dtype)


def gqa_eager(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads: int, kv_heads: int):
    """GroupQueryAttention's maths (the module docstring) -> (out [B, S, H*D], present_k, present_v)."""
    b, s, _ = q.shape
    d = q.shape[-1] // num_heads
    q = q.view(b, s, num_heads, d).transpose(1, 2)  # [B, H, S, D]
    k = k.view(b, s, kv_heads, d).transpose(1, 2)  # [B, Hkv, S, D]
    v = v.view(b, s, kv_heads, d).transpose(1, 2)
    first = past_k.shape[2] == 0 or s == int(total)  # a prompt: no past, or a buffer filled from 0
    start = torch.zeros_like(seqlens_k) if first else seqlens_k.long() + 1 - s  # [B] first new position
    pos = start.long()[:, None] + torch.arange(s)[None]  # [B, S]
    q, k = _rotary(q, pos, cos, sin), _rotary(k, pos, cos, sin)
    if past_k.shape[2] == 0:
        pk, pv = k, v
    else:
        pk, pv = past_k.clone(), past_v.clone()
        for r in range(b):
            pk[r, :, pos[r]] = k[r]
            pv[r, :, pos[r]] = v[r]
    rep = num_heads // kv_heads
    kk, vv = pk.repeat_interleave(rep, dim=1), pv.repeat_interleave(rep, dim=1)  # [B, H, K, D]
    scores = (q @ kk.transpose(2, 3)).float() * d ** -0.5  # [B, H, S, K]
    key_pos = torch.arange(kk.shape[2])[None, None, None, :]
    allowed = key_pos <= pos[:, None, :, None]  # causal, per row's own positions
    probs = torch.softmax(torch.where(allowed, scores, torch.finfo(scores.dtype).min), dim=-1).to(q.dtype)
    out = (probs @ vv).transpose(1, 2).reshape(b, s, num_heads * d)
    return out, pk, pv


class _GQA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads: int, kv_heads: int,
                head_dim: int):  # noqa: D102
        if k is q:  # packed [q | k | v]
            d = q.shape[-1] // (num_heads + 2 * kv_heads)
            q, k, v = torch.split(q, [num_heads * d, kv_heads * d, kv_heads * d], dim=-1)
        if torch.jit.is_tracing():
            # Shapes only: the tracer records symbolic(); the values are never read.
            first = past_k.shape[2] == 0
            return q.clone(), (k.view(k.shape[0], k.shape[1], kv_heads, -1).transpose(1, 2).clone() if first
                               else past_k.clone()), (v.view(v.shape[0], v.shape[1], kv_heads, -1).transpose(1, 2)
                                                      .clone() if first else past_v.clone())
        return gqa_eager(q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads)

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, cos, sin, num_heads: int, kv_heads: int,
                 head_dim: int):  # noqa: D102
        out, pk, pv = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total, cos, sin,
                           num_heads_i=num_heads, kv_num_heads_i=kv_heads, do_rotary_i=1, rotary_interleaved_i=0,
                           local_window_size_i=-1, softcap_f=0.0, outputs=3)
        out = out.setType(q.type().with_sizes([None, None, num_heads * head_dim]))  # [B, S, H*D]
        return out, pk.setType(past_k.type()), pv.setType(past_v.type())


def gqa(qkv, past_k, past_v, seqlens_k, total, cos, sin, num_heads: int, kv_heads: int, head_dim: int):
    """GroupQueryAttention (the module docstring) on packed qkv [B, S, (H + 2*Hkv)*D], past
    [B, Hkv, M or 0, D], seqlens_k [B] int32, total [] int32 -> (out, present_k, present_v).
    Traced with qkv in its query, key and value slots; packed_qkv() then empties the last two,
    which is how onnxruntime takes a packed input."""
    return _GQA.apply(qkv, qkv, qkv, past_k, past_v, seqlens_k, total, cos, sin, num_heads, kv_heads, head_dim)


def packed_qkv(graph) -> None:
    """Rewrite every traced GroupQueryAttention (query = key = value = packed qkv) to the packed
    form onnxruntime expects: key and value inputs empty."""
    for node in graph.node:
        if node.op_type == "GroupQueryAttention" and node.input[1] == node.input[0] == node.input[2]:
            node.input[1] = node.input[2] = ""


class _RowsLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, rows, a, b):  # noqa: D102
        r = rows[:, 0]
        return y.index_add(0, r, (x.index_select(0, r) @ a) @ b)

    @staticmethod
    def symbolic(g, y, x, rows, a, b):  # noqa: D102
        xs = g.op("GatherND", x, rows)  # [n, T, d_in]
        update = g.op("MatMul", g.op("MatMul", xs, a), b)  # [n, T, d_out]
        return g.op("ScatterND", y, rows, update, reduction_s="add").setType(y.type())


def rows_lora(y: Tensor, x: Tensor, rows: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """y [B, T, d_out] with (x[rows] @ a) @ b added to the rows listed in rows [n, 1] (each row
    at most once; a [n, d_in, r], b [n, r, d_out]). Four nodes: GatherND, MatMul, MatMul,
    ScatterND(add); rows that use no module cost nothing."""
    return _RowsLora.apply(y, x, rows, a, b)


_ONNX_TYPES = {"Float": 1, "Half": 10, "Long": 7, "Int": 6, "Bool": 9}


class _Select(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cond, n: int, *values):  # noqa: D102
        then, other = values[:n], values[n:]
        if torch.jit.is_tracing():  # the tracer records symbolic(); only the outputs' kinds matter
            return tuple(v.clone() for v in then)
        return tuple(v.clone() for v in (then if bool(cond) else other))

    @staticmethod
    def symbolic(g, cond, n: int, *values):  # noqa: D102
        then = values[:n]
        outs = g.op("milora::Select", cond, *values, n_i=n,
                    types_i=[_ONNX_TYPES[v.type().scalarType()] for v in then], outputs=n)
        outs = outs if n > 1 else (outs,)
        return tuple(o.setType(v.type()) for o, v in zip(outs, then))


def select(cond: Tensor, then: list[Tensor], other: list[Tensor]) -> list[Tensor]:
    """then if cond (a bool scalar) else other, computing only the side taken: traced to one
    milora::Select node that branches.select_to_if() turns into an If whose branches hold the
    nodes only that side needs (eager PyTorch computes both and returns one). then and other:
    the same number of tensors of the same dtypes; their shapes may differ."""
    if len(then) != len(other):
        raise ValueError(f"select needs as many values on both sides, got {len(then)} and {len(other)}")
    return list(_Select.apply(cond, len(then), *then, *other))
