"""milora::RoutedLora for TensorRT, through its Python plugin API (tensorrt.plugin). Thin: the
rules live in plugin_spec.py, the kernel in kernels.py, its compilation in aot.py.

    from milora.plugins.trt_plugin import register
    register()          # before parsing a graph written by milora-export --target tensorrt

    @trtp.register      shape/type descriptor: y is base_out (aliased: updated in place)
    @trtp.autotune      one type combination (fp32 | fp16 | bf16 data, int64 slots, fp32 gates)
                        and every tactic of launch.TACTICS (block sizes), timed by TensorRT
    @trtp.impl          just-in-time: the kernel through PyTorch on TensorRT's stream (debugging;
                        needs torch and triton where the engine runs)
    @trtp.aot_impl      ahead-of-time: PTX compiled for the build GPU (or read from a directory
                        written by python -m milora.plugins.aot, MILORA_PLUGIN_AOT_DIR) and its
                        launch; the engine then runs without Python (trtexec, C++)

An engine built from the ONNX graph uses the AOT implementation when the node carries an int
attribute aot = 1; milora-build-engines adds it to the graph it parses (milora/plugins/build.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from milora.errors import DependencyError
from milora.plugins import launch
from milora.plugins import plugin_spec as spec

AOT_DIR_ENV = "MILORA_PLUGIN_AOT_DIR"
ARCH_ENV = "MILORA_PLUGIN_ARCH"
_REGISTERED: dict[str, Any] = {}
_KERNELS: dict[tuple, Any] = {}


def import_tensorrt():
    """(tensorrt, tensorrt.plugin), or DependencyError saying what to install."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise DependencyError(f"TensorRT is not installed ({exc}); install it on a machine with an NVIDIA GPU: "
                              "pip install 'milora[tensorrt]' (TensorRT >= 10.8 with tensorrt.plugin), or use "
                              "JetPack's TensorRT on Jetson") from None
    if not hasattr(trtp, "aot_impl"):
        raise DependencyError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl; install TensorRT >= 10.8")
    return trt, trtp


def capability() -> int:
    """Compute capability the AOT kernels are compiled for: MILORA_PLUGIN_ARCH (e.g. 87), else
    the GPU of this process (engines are built on the GPU they run on)."""
    if os.environ.get(ARCH_ENV):
        return int(os.environ[ARCH_ENV].lower().removeprefix("sm_"))
    try:
        from triton.runtime import driver

        return int(driver.active.get_current_target().arch)
    except Exception as exc:  # noqa: BLE001 - no driver, no GPU: say what to set
        raise DependencyError(f"cannot read this GPU's compute capability through triton ({exc}); set "
                              f"{ARCH_ENV}=87 (Jetson Orin), 90 (Hopper), ...") from None


def aot_kernel(dtype: str, tactic: int, rank: int, divisible: dict[str, int]):
    """The compiled kernel for one node: from MILORA_PLUGIN_AOT_DIR when it holds one for this
    GPU, dtype, tactic and padded rank, else compiled now (cached per process)."""
    from milora.plugins import aot

    cap, params = capability(), launch.kernel_params(tactic, rank, dtype)
    key = (dtype, tactic, params.R_PAD, cap, tuple(sorted(divisible.items())))
    if key not in _KERNELS:
        _KERNELS[key] = _precompiled(cap, dtype, tactic, params) or aot.compile_kernel(
            dtype, tactic, rank, cap, divisible=divisible)
    return _KERNELS[key]


def _precompiled(cap: int, dtype: str, tactic: int, params: launch.KernelParams):
    root = os.environ.get(AOT_DIR_ENV)
    if not root:
        return None
    from types import SimpleNamespace

    doc = json.loads((Path(root) / "aot.json").read_text())
    for k in doc["kernels"]:
        if (k["capability"], k["dtype"], k["tactic"], k["constexprs"]) == (cap, dtype, tactic, params.constexprs()):
            return SimpleNamespace(name=k["name"], ptx=(Path(root) / k["ptx"]).read_text(),
                                   shared=k["shared_memory_bytes"], num_warps=k["num_warps"])
    return None


def register() -> None:
    """Register milora::RoutedLora with tensorrt.plugin (once per process)."""
    if _REGISTERED:
        return
    trt, trtp = import_tensorrt()
    in_place = spec.in_place()

    @trtp.register(spec.PLUGIN_ID)
    def _desc(x: trtp.TensorDesc, base_out: trtp.TensorDesc, lora_A: trtp.TensorDesc, lora_B: trtp.TensorDesc,
              tenant_slots: trtp.TensorDesc, layer_gates: trtp.TensorDesc, layer: int, expert: int) -> trtp.TensorDesc:
        ins = (x, base_out, lora_A, lora_B, tenant_slots, layer_gates)
        spec.check_io([t.dtype.name for t in ins], [t.ndim for t in ins])
        return base_out.aliased() if in_place else base_out.like()

    @trtp.autotune(spec.PLUGIN_ID)
    def _autotune(x, base_out, lora_A, lora_B, tenant_slots, layer_gates, outputs) -> list:
        combo = trtp.AutoTuneCombination()
        for positions, types in spec.AUTOTUNE_TYPES:
            combo.pos(positions, types)
        combo.tactics(spec.tactic_ids())
        return [combo]

    @trtp.impl(spec.PLUGIN_ID)
    def _impl(x, base_out, lora_A, lora_B, tenant_slots, layer_gates, layer: int, expert: int, outputs, stream,
              tactic) -> None:
        import torch

        from milora.plugins import torch_ops

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            ts = [torch.as_tensor(t, device="cuda") for t in (x, base_out, lora_A, lora_B, tenant_slots, layer_gates)]
            torch_ops.routed_lora(*ts, layer, expert, tactic=spec.known_tactic(tactic),
                                  out=torch.as_tensor(outputs[0], device="cuda"))

    @trtp.aot_impl(spec.PLUGIN_ID)
    def _aot_impl(x, base_out, lora_A, lora_B, tenant_slots, layer_gates, layer: int, expert: int, outputs, tactic):
        tactic = spec.known_tactic(tactic)
        dtype = spec.kernel_dtype(x.dtype.name)
        rank = spec.static_dim(_dim(lora_A, 3), "the rank of lora_A (its last axis)")
        divisible = {n: d for n, d in (("D_IN", _dim(x, 2)), ("D_OUT", _dim(base_out, 2))) if isinstance(d, int)}
        art = aot_kernel(dtype, tactic, rank, divisible)
        params = launch.kernel_params(tactic, rank, dtype)
        dims = [list(t.shape_expr) for t in (x, base_out, lora_A, lora_B, tenant_slots, layer_gates)]
        cfg = spec.launch_config(dims, layer, expert, params, trtp.cdiv)
        lp = trtp.KernelLaunchParams()
        lp.grid_x, lp.grid_y, lp.grid_z = cfg["grid"]
        lp.block_x = art.num_warps * 32
        lp.shared_mem = art.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in cfg["scalars"]])
        return art.name.encode(), art.ptx.encode(), lp, extra

    _REGISTERED.update(desc=_desc, autotune=_autotune, impl=_impl, aot_impl=_aot_impl)


def _dim(desc, i: int):
    """Dimension i of a TensorDesc as an int when it is known at build time, else None."""
    try:
        value = int(desc.shape[i])
        if value > 0:
            return value
    except (AttributeError, ValueError, TypeError, IndexError):
        pass
    expr = desc.shape_expr[i]
    if not expr.is_fake and expr.is_constant:
        return int(expr.constant_value())
    return None
