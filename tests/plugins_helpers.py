"""Helpers for the milora.plugins tests: random RoutedLora problems, subprocesses with a clean
or an interpreting Triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def make_problem(seed: int, B: int, T: int, d_in: int, d_out: int, R: int, S: int = 3, L: int = 2, dtype=None,
                 active: float = 0.6):
    """Random RoutedLora inputs: slot 0's banks are zero (the base model), about `active` of the
    rows have a non-zero gate at every expert, the rest 0."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d_in, generator=g).to(dtype)
    base = torch.randn(B, T, d_out, generator=g).to(dtype)
    a = (torch.randn(S, L, d_in, R, generator=g) / d_in ** 0.5).to(dtype)
    b = (torch.randn(S, L, R, d_out, generator=g) * 0.5).to(dtype)
    a[0], b[0] = 0, 0
    slots = torch.randint(0, S, (B,), generator=g)
    gates = torch.rand(B, 7, generator=g) + 0.1
    gates[torch.rand(B, generator=g) > active] = 0
    return x, base, a, b, slots, gates


def python_env(interpret: bool) -> dict[str, str]:
    """The environment of a subprocess that imports milora and the test helpers, with Triton's
    interpreter on or (for ahead-of-time compilation) certainly off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; fusion on is its default
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def run_json(args: list[str], interpret: bool, timeout: float = 600) -> dict:
    """Run `python args...` and parse the JSON document it prints last."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=python_env(interpret),
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_EXPORTS: dict[str, Path] = {}


def tensorrt_export(tmp_path_factory) -> tuple[Path, Path]:
    """(model_dir, out_dir) of the tiny export with --target tensorrt (runtime_helpers.export_tiny),
    made once per test session and shared by the plugins tests (about 10 s)."""
    if "tensorrt" not in _EXPORTS:
        from runtime_helpers import export_tiny

        model_dir, out_dir = export_tiny(tmp_path_factory.mktemp("trt_export"), target="tensorrt")
        _EXPORTS["tensorrt"], _EXPORTS["model"] = out_dir, model_dir
    return _EXPORTS["model"], _EXPORTS["tensorrt"]


class OrtStandInRunner:
    """Stands in for a TensorRT engine in the backend's tests: runs the same ONNX graph with
    onnxruntime (its function body for milora::RoutedLora) on the tensors bound in a HostDevice,
    exactly as TensorRT would read and write them (shapes per call, outputs into bound buffers)."""

    def __init__(self, path: Path, device, manifest: dict, graph: str):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.device, self.manifest, self.graph = device, manifest, graph
        self.calls: list[dict[str, tuple]] = []

    def run(self, shapes, addresses, stream):
        import numpy as np

        from milora.format.manifest import NP_DTYPES

        dtypes = {t["name"]: NP_DTYPES[t["dtype"]] for side in ("inputs", "outputs")
                  for t in self.manifest["graphs"][self.graph][side]}
        assert set(shapes) == {i.name for i in self.session.get_inputs()}, "every input gets a shape per call"
        feeds = {n: np.array(self.device.view(addresses[n], s, dtypes[n])) for n, s in shapes.items()}
        names = [o.name for o in self.session.get_outputs()]
        assert set(names) <= set(addresses), "every output is bound"
        for name, value in zip(names, self.session.run(names, feeds)):
            self.device.view(addresses[name], value.shape, dtypes[name])[...] = value
        self.calls.append(dict(shapes))


def stand_in_backend(bundle, limits: dict):
    """A TensorRTBackend on host memory whose engines are onnxruntime sessions of the same graphs."""
    from milora.plugins.device import HostDevice
    from milora.plugins.trt_backend import TensorRTBackend

    dev = HostDevice()
    runners = {g: OrtStandInRunner(bundle.root / bundle.manifest["graphs"][g]["file"], dev, bundle.manifest, g)
               for g in ("prefill", "decode")}
    return TensorRTBackend(bundle.root, bundle.manifest, pad_token_id=bundle.pad_token_id, runners=runners,
                           device=dev, limits=limits)
