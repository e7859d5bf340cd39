"""A Python implementation of milora::RoutedLora for onnxruntime (onnxruntime-extensions), so
the TensorRT-target graph can be run on CPU against a model of the plugin (float32 graphs).
Registered, it takes precedence over the graph's function body.

    with_python_op() -> SessionOptions that resolve RoutedLora to routed_lora_numpy.
"""

from __future__ import annotations

import numpy as np

from milora.export import routed_lora as rl

_REGISTERED = False
CALLS = {"count": 0}  # how many times the Python op ran (tests check it was the one used)


def routed_lora_numpy(x, base_out, lora_a, lora_b, slots, layer_gates, layer: int, expert: int) -> np.ndarray:
    """The plugin's contract in numpy: only rows whose gate is non-zero are computed."""
    CALLS["count"] += 1
    y = np.array(base_out, copy=True)
    for row in np.nonzero(layer_gates[:, expert])[0]:
        a = lora_a[slots[row], layer]  # [d_in, R]
        b = lora_b[slots[row], layer]  # [R, d_out]
        y[row] += ((x[row] @ a) * layer_gates[row, expert].astype(x.dtype)) @ b
    return y


def with_python_op():
    """SessionOptions with the Python RoutedLora registered (float32 inputs)."""
    global _REGISTERED
    import onnxruntime as ort
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _REGISTERED:
        f, i = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64

        @onnx_op(op_type=f"{rl.DOMAIN}::{rl.OP_TYPE}", inputs=[f, f, f, f, i, f], outputs=[f],
                 attrs={"layer": i, "expert": i, "plugin_namespace": PyCustomOpDef.dt_string,
                        "plugin_version": PyCustomOpDef.dt_string})
        def _routed_lora(x, base_out, lora_a, lora_b, slots, layer_gates, **attrs):
            return routed_lora_numpy(x, base_out, lora_a, lora_b, slots, layer_gates, int(attrs["layer"]),
                                     int(attrs["expert"]))

        _REGISTERED = True
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    return so
