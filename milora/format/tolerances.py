"""How close two computations of the same maths must be: one table keyed by (backend, dtype),
read by the exporter's validation and by the tests. Each entry is (atol, rtol):
|got - want| <= atol + rtol * |want|, elementwise.

Backends:
    onnxruntime  an exported graph against the PyTorch reference (export validation)
    runtime      the runtime against itself across batch shapes (a request alone vs batched:
                 different GEMM shapes round differently) and onnxruntime session options
    torch        two PyTorch computations of the same maths in another order (batched vs alone,
                 merged vs unmerged LoRA, an imported adapter vs its source library, recompute)

Kinds: logits, present (KV), activations (a layer's output), gates, logprobs, scores (summed
option log-likelihoods), loss, weights (parameters and gradients).
"margin" (onnxruntime only) is not a pair: router selections are compared only where the
reference's k-th and (k+1)-th logits differ by more than it (closer is a near-tie).
"""

from __future__ import annotations

from milora.errors import MiloraError

Pair = tuple[float, float]

TOLERANCES: dict[tuple[str, str], dict[str, Pair | float]] = {
    # gates: a router pools hidden states whose outlier channels reach |x| ~ 600 on SmolLM2, so
    # float32 rounding in another summation order moves its logits by ~1e-3 and a gate by a few
    # 1e-4 (seen at 2.2e-4 and 3.4e-4 on a k=2 demo tenant with --torch-threads 1); a wrong
    # gate formula is off by orders more, and the selections are compared exactly.
    ("onnxruntime", "float32"): {"logits": (2e-4, 1e-4), "present": (1e-4, 1e-4), "gates": (1e-4, 1e-3),
                                 "margin": 1e-4},
    ("onnxruntime", "float16"): {"logits": (6e-2, 2e-2), "present": (3e-2, 2e-2), "gates": (4e-3, 1e-2),
                                 "margin": 2e-2},
    ("runtime", "float32"): {"logits": (1e-5, 1e-7), "present": (1e-5, 1e-7), "logprobs": (1e-4, 0.0),
                             "scores": (1e-4, 1e-7)},
    ("torch", "float32"): {"logits": (1e-5, 1e-5), "activations": (1e-6, 1e-5), "gates": (1e-6, 1e-5),
                           "loss": (1e-5, 1e-5), "weights": (1e-6, 1e-5), "scores": (1e-4, 1e-4)},
}


def tolerance(backend: str, dtype: str, kind: str) -> Pair:
    """(atol, rtol) for one comparison; a typed error names what exists when the key does not."""
    table = TOLERANCES.get((backend, dtype))
    if table is None:
        raise MiloraError(f"no tolerances for backend {backend!r} at dtype {dtype!r}; known: "
                          f"{sorted(TOLERANCES)}")
    value = table.get(kind)
    if not isinstance(value, tuple):
        raise MiloraError(f"no (atol, rtol) for {kind!r} on ({backend}, {dtype}); known: "
                          f"{sorted(k for k, v in table.items() if isinstance(v, tuple))}")
    return value


def close(backend: str, kind: str, dtype: str = "float32") -> dict[str, float]:
    """{"atol": .., "rtol": ..} for torch.allclose / torch.testing.assert_close / numpy's."""
    atol, rtol = tolerance(backend, dtype, kind)
    return {"atol": atol, "rtol": rtol}


def margin(backend: str, dtype: str) -> float:
    """The near-tie threshold for router selections (see the module docstring)."""
    return float(TOLERANCES[(backend, dtype)]["margin"])
