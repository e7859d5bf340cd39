"""TensorRT side of milora: the routed LoRA kernel (Triton), its TensorRT plugin, engine builds
and a TensorRT backend for milora.runtime.Engine (docs/tensorrt.md).

    launch.py       tactics, launch grids, kernel parameters (plain Python)
    kernels.py      the Triton kernel (needs triton)
    torch_ops.py    routed_lora / routed_lora_: the kernel from PyTorch (needs torch + triton)
    aot.py          ahead-of-time compilation to PTX / cubin for sm_87, sm_90, ... (needs triton)
    plugin_spec.py  the plugin's shape / type / tactic logic (plain Python)
    trt_plugin.py   milora::RoutedLora registered with tensorrt.plugin (needs tensorrt)
    build.py        milora-build-engines: profiles, precisions, timing cache (needs tensorrt to build)
    trt_backend.py  a milora.runtime Backend on TensorRT engines (needs tensorrt; no torch)

Nothing here is imported by milora.runtime; every optional dependency is imported where it is
used and its absence is a DependencyError that says what to install.
"""
