"""The routed LoRA GEMM as one Triton kernel: milora::RoutedLora exactly as the tensorrt target's
node defines it (milora/export/routed_lora.py), computing only the (row, module) pairs the
routing switched on.

Shape legend: B rows, T tokens, d_in / d_out the linear's sizes, S slots, L layers, R rank
(R_PAD: R rounded up to a power of two), G gates per row.

    x [B, T, d_in], base_out [B, T, d_out], lora_A [S, L, d_in, R], lora_B [S, L, R, d_out],
    tenant_slots [B] int64, layer_gates [B, G] float32  ->  y [B, T, d_out]

Per program (b, tile of BLOCK_T tokens, tile of BLOCK_N output columns):

    slot = tenant_slots[b];  g = layer_gates[b, expert]
    if slot < 0 or slot >= S:             y[b, tile] = NaN     (a bad slot fails its own row only)
    elif slot != 0 and g != 0:            (NaN != 0: a NaN gate is "on" and stays in row b)
        A = lora_A[slot, layer]  [d_in, R]      B = lora_B[slot, layer]  [R, d_out]
        u = 0 [BLOCK_T, R_PAD] fp32
        for k in 0 .. d_in step BLOCK_K:                  # shrink, Punica-style
            u += x[b, tile, k:k+BLOCK_K] @ A[k:k+BLOCK_K, :R]
        u = u * g
        y[b, tile, cols] = base_out[b, tile, cols] + u @ B[:R, cols]     # expand
    elif y is not base_out:
        y[b, tile, cols] = base_out[b, tile, cols]        # inactive row: a copy, no LoRA bytes
    (y is base_out, in place: an inactive row is not touched at all)

Slot 0 is the base model (all-zero banks): its rows are skipped whatever the gate, so they are
base_out bit for bit. A row whose gate is 0 is skipped even if its tenant's banks hold NaN
(the onnxruntime lowerings that pick rows do the same). Every program recomputes the shrink
of its token tile (d_in x R, small) so one launch needs no scratch memory: TensorRT's
ahead-of-time plugins launch exactly one kernel and get no workspace.

The decode kernel (BLOCK_T == 1) multiplies with broadcast FMAs: a 1-token row cannot fill
tl.dot's 16-row tile. The prefill kernel (BLOCK_T >= 16) uses tl.dot with fp32 accumulation;
fp16/bf16 operands go to the tensor cores, fp32 ones use input_precision="ieee" (exact, as the
PyTorch reference; tf32 would differ by ~1e-3). DOT_F32 upcasts fp16/bf16 operands first: the
Triton interpreter computes bf16 dots wrongly, so the CPU tests set it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def routed_lora_kernel(x_ptr, base_ptr, a_ptr, b_ptr, slots_ptr, gates_ptr,
                       B, T, D_IN, D_OUT, R, S, L, G, layer, expert,
                       y_ptr,
                       BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                       DOT_F32: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(slots_ptr + row)  # int64
    gate = tl.load(gates_ptr + row * G + expert)  # float32

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] token of the row
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output column
    t_ok = t < T
    n_ok = n < D_OUT
    out_off = (row * T + t[:, None]) * D_OUT + n[None, :]  # [BLOCK_T, BLOCK_N] into base_out / y
    out_ok = t_ok[:, None] & n_ok[None, :]
    # In place (y aliases base_out: TensorRT's aliased output) inactive rows need no copy. Decided
    # from the addresses at run time, so one compiled kernel is right whether or not the caller
    # (or TensorRT) aliased the output.
    in_place = base_ptr.to(tl.int64, bitcast=True) == y_ptr.to(tl.int64, bitcast=True)

    if (slot < 0) | (slot >= S):
        # Never fed by milora's runtimes (they check slots first); reading another tenant's or
        # unmapped memory would be worse than failing the row visibly.
        nan = tl.full([BLOCK_T, BLOCK_N], float("nan"), tl.float32)
        tl.store(y_ptr + out_off, nan.to(y_ptr.dtype.element_ty), mask=out_ok)
    elif (slot != 0) & (gate != 0):
        r = tl.arange(0, R_PAD)
        r_ok = r < R
        bank = slot * L + layer  # int64: flat index of (slot, layer) in [S*L, ...]
        a_base = a_ptr + bank * D_IN * R
        b_base = b_ptr + bank * R * D_OUT
        x_base = x_ptr + (row * T + t) * D_IN  # [BLOCK_T] row starts

        u = tl.zeros([BLOCK_T, R_PAD], dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < D_IN
            xk = tl.load(x_base[:, None] + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # [BT, BK]
            ak = tl.load(a_base + k[:, None] * R + r[None, :], mask=k_ok[:, None] & r_ok[None, :],
                         other=0.0)  # [BK, R_PAD]
            if BLOCK_T == 1:
                # [1, BK, 1] * [1, BK, R_PAD] summed over k -> [1, R_PAD]
                u += tl.sum(xk.to(tl.float32)[:, :, None] * ak.to(tl.float32)[None, :, :], axis=1)
            elif DOT_F32:
                u += tl.dot(xk.to(tl.float32), ak.to(tl.float32), input_precision="ieee")
            elif xk.dtype == tl.float32:
                u += tl.dot(xk, ak, input_precision="ieee")
            else:
                u += tl.dot(xk, ak)  # fp16 / bf16 tensor cores, fp32 accumulator
        u = u * gate

        bn = tl.load(b_base + r[:, None] * D_OUT + n[None, :], mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)  # [R_PAD, BN]
        if BLOCK_T == 1:
            acc = tl.sum(u[:, :, None] * bn.to(tl.float32)[None, :, :], axis=1)  # [1, BN]
        elif DOT_F32:
            acc = tl.dot(u, bn.to(tl.float32), input_precision="ieee")
        elif bn.dtype == tl.float32:
            acc = tl.dot(u, bn, input_precision="ieee")
        else:
            # Round u to the bank dtype for the tensor cores, as the reference rounds x @ A.
            acc = tl.dot(u.to(bn.dtype), bn)
        base = tl.load(base_ptr + out_off, mask=out_ok, other=0.0)
        tl.store(y_ptr + out_off, (base.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=out_ok)
    elif not in_place:
        base = tl.load(base_ptr + out_off, mask=out_ok, other=0.0)
        tl.store(y_ptr + out_off, base, mask=out_ok)
