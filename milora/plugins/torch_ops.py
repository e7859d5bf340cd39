"""PyTorch entry points of the routed LoRA kernel, with the signature of
milora.export.routed_lora.routed_lora_reference:

    y = routed_lora(x, base_out, lora_a, lora_b, slots, layer_gates, layer, expert)   # new tensor
    routed_lora_(x, base_out, lora_a, lora_b, slots, layer_gates, layer, expert)      # in place

Shape legend: B rows, T tokens, d_in / d_out, S slots, L layers, R rank, G = 7 gates.
x [B, T, d_in], base_out [B, T, d_out], lora_a [S, L, d_in, R], lora_b [S, L, R, d_out] (one
dtype: float32, float16 or bfloat16), slots [B] int64, layer_gates [B, G] float32.

In place, rows that do not use the module (slot 0, gate 0) cost a read of their slot and gate
and nothing else; routed_lora copies their base_out rows into the new tensor. Runs on CUDA
tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before
milora.plugins.kernels is first imported; that is how the tests run it).
"""

from __future__ import annotations

import torch

from milora.errors import RequestError
from milora.plugins import launch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    from milora.plugins import kernels

    return kernels


def interpreted() -> bool:
    """True when the kernel module was decorated by the Triton interpreter (CPU tensors)."""
    return type(_kernels().routed_lora_kernel).__name__ == "InterpretedFunction"


def _check(x, base_out, lora_a, lora_b, slots, layer_gates, layer, expert) -> launch.Problem:
    tensors = {"x": x, "base_out": base_out, "lora_a": lora_a, "lora_b": lora_b, "slots": slots,
               "layer_gates": layer_gates}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise RequestError(f"routed_lora: {name} must be a torch.Tensor, got {type(t).__name__}")
    p = launch.problem([tuple(t.shape) for t in tensors.values()], layer, expert)
    dtypes = {n: tensors[n].dtype for n in ("x", "base_out", "lora_a", "lora_b")}
    if x.dtype not in _DTYPES or len(set(dtypes.values())) != 1:
        raise RequestError(f"routed_lora: x, base_out, lora_a and lora_b must share one dtype of float32, float16, "
                           f"bfloat16; got {dtypes}")
    if slots.dtype != torch.int64 or layer_gates.dtype != torch.float32:
        raise RequestError(f"routed_lora: slots must be int64 and layer_gates float32 (the graph's types); got "
                           f"{slots.dtype} and {layer_gates.dtype}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise RequestError(f"routed_lora: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreted():
        raise RequestError(f"routed_lora runs on CUDA tensors (got {device}); on a CPU set TRITON_INTERPRET=1 before "
                           "milora.plugins.kernels is imported to run it in the Triton interpreter")
    return p


def _launch(x, base_out, lora_a, lora_b, slots, layer_gates, y, p: launch.Problem, tactic: int | None) -> None:
    params = launch.kernel_params(tactic or launch.default_tactic(p.T), p.R, str(x.dtype).removeprefix("torch."))
    if p.B == 0 or p.T == 0 or p.D_OUT == 0:
        return
    args = [t.contiguous() for t in (x, base_out, lora_a, lora_b, slots, layer_gates)]
    # bf16 tl.dot is wrong in the Triton interpreter: upcast there (on a GPU the tensor cores
    # take fp16/bf16 directly).
    dot_f32 = interpreted()
    _kernels().routed_lora_kernel[launch.grid(p.B, p.T, p.D_OUT, params)](
        *args, *p.scalars(), y, **params.constexprs(), DOT_F32=dot_f32,
        **({} if dot_f32 else {"num_warps": params.num_warps, "num_stages": params.num_stages}))


def routed_lora(x, base_out, lora_a, lora_b, slots, layer_gates, layer: int, expert: int,
                tactic: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = base_out + gate[b] * (x[b] @ A[slot[b], layer]) @ B[slot[b], layer] for rows whose slot is
    not 0 and whose gate is not 0 (NaN counts as on); base_out elsewhere. A new tensor, or
    `out` (contiguous, base_out's shape and dtype; `out` sharing base_out's memory = in place)."""
    p = _check(x, base_out, lora_a, lora_b, slots, layer_gates, layer, expert)
    if out is None:
        out = torch.empty_like(base_out, memory_format=torch.contiguous_format)
    elif out.shape != base_out.shape or out.dtype != base_out.dtype or not out.is_contiguous():
        raise RequestError(f"routed_lora: out must be a contiguous {base_out.dtype} tensor of shape "
                           f"{list(base_out.shape)}, got {out.dtype} {list(out.shape)} (contiguous: {out.is_contiguous()})")
    if out.data_ptr() == base_out.data_ptr() and not base_out.is_contiguous():
        raise RequestError("routed_lora: base_out must be contiguous to be updated in place")
    # The kernel sees in place from the addresses (out is base_out): inactive rows are then untouched.
    _launch(x, base_out, lora_a, lora_b, slots, layer_gates, out, p, tactic)
    return out


def routed_lora_(x, base_out, lora_a, lora_b, slots, layer_gates, layer: int, expert: int,
                 tactic: int | None = None) -> torch.Tensor:
    """routed_lora written into base_out (which must be contiguous); returns base_out."""
    if isinstance(base_out, torch.Tensor) and not base_out.is_contiguous():
        raise RequestError("routed_lora_: base_out must be contiguous to be updated in place; call "
                           "routed_lora (a new tensor) instead")
    return routed_lora(x, base_out, lora_a, lora_b, slots, layer_gates, layer, expert, tactic=tactic, out=base_out)


def plugin_contract(x, base_out, lora_a, lora_b, slots, layer_gates, layer: int, expert: int) -> torch.Tensor:
    """The kernel's semantics in PyTorch (float64 accumulation), row by row: the reference
    (routed_lora_reference) on rows whose slot is not 0 and whose gate is not 0, base_out on
    the others. Tests compare the kernel with this."""
    y = base_out.clone()
    for row in range(x.shape[0]):
        slot, gate = int(slots[row]), layer_gates[row, expert]
        if slot == 0 or gate == 0:
            continue
        a = lora_a[slot, layer].double()  # [d_in, R]
        b = lora_b[slot, layer].double()  # [R, d_out]
        y[row] = (base_out[row].double() + ((x[row].double() @ a) * gate.double()) @ b).to(y.dtype)
    return y


__all__ = ["routed_lora", "routed_lora_", "plugin_contract", "interpreted"]
