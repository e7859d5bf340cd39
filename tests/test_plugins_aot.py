"""Ahead-of-time compilation of the routed LoRA kernel without a GPU (milora.plugins.aot), in a
clean subprocess (no TRITON_INTERPRET): PTX and cubin for sm_87 (Jetson Orin), sm_90 (Hopper)
and the newest target the pinned Triton knows, with the metadata TensorRT's plugin needs."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("triton", reason="triton is not installed: pip install 'milora[kernels]' (triton==3.9.0 installs "
                                     "on CPU) to compile the kernel ahead of time")

from milora.errors import DependencyError, UsageError  # noqa: E402
from milora.plugins import aot, launch  # noqa: E402
from plugins_helpers import python_env, run_json  # noqa: E402

TACTICS = (2, 5)  # one decode and one prefill shape
DTYPES = ("float16", "bfloat16")


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "milora.plugins.aot", str(out), "--arch", "87", "90", "newest",
                           "--dtype", *DTYPES, "--tactic", *map(str, TACTICS), "--rank", "16"],
                          capture_output=True, text=True, env=python_env(interpret=False), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "aot.json").read_text())


def test_one_kernel_per_target_dtype_and_tactic(artefacts):
    _, doc = artefacts
    caps = sorted({k["capability"] for k in doc["kernels"]})
    assert caps[:2] == [87, 90] and caps[2] >= 120, caps  # triton 3.9's ptxas knows up to sm_121
    assert len(doc["kernels"]) == len(caps) * len(DTYPES) * len(TACTICS)


def test_ptx_names_its_target_and_takes_what_tensorrt_passes(artefacts):
    out, doc = artefacts
    for k in doc["kernels"]:
        ptx = (out / k["ptx"]).read_text()
        suffix = "a" if k["capability"] >= 90 else ""  # Triton targets sm_90a and newer
        assert re.search(rf"^\.target sm_{k['capability']}{suffix}\b", ptx, re.M), k
        assert k["target"] == f"sm_{k['capability']}{suffix}"
        params = re.search(r"\.entry \w+\((.*?)\)", ptx, re.S).group(1).split(",")
        kinds = [".u64" if ".u64" in p else ".u32" for p in params]
        # (6 input pointers, 10 int32 scalars, 1 output pointer): no Triton scratch pointers
        assert kinds == [".u64"] * 6 + [".u32"] * len(launch.SCALARS) + [".u64"], k
        assert k["entry_params"] == 17


def test_cubins_are_elf_and_metadata_is_recorded(artefacts):
    out, doc = artefacts
    for k in doc["kernels"]:
        cubin = (out / k["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF" and len(cubin) == k["cubin_bytes"] > 1000
        tactic = launch.TACTICS[k["tactic"]]
        assert k["num_warps"] == tactic.num_warps and k["block_threads"] == 32 * tactic.num_warps
        assert isinstance(k["shared_memory_bytes"], int) and 0 <= k["shared_memory_bytes"] <= 99 * 1024
        assert k["registers"] and k["registers"] <= 255 and k["spill_bytes"] == 0, k
        assert k["constexprs"] == launch.kernel_params(k["tactic"], 16, k["dtype"]).constexprs()
        assert k["triton"] == "3.9.0"


def test_decode_kernels_use_no_shared_memory_tile_for_a_dot(artefacts):
    _, doc = artefacts
    shared = {(k["capability"], k["tactic"]): k["shared_memory_bytes"] for k in doc["kernels"]}
    for cap in {c for c, _ in shared}:
        assert shared[(cap, 2)] < shared[(cap, 5)], "the prefill kernel stages tl.dot tiles in shared memory"


def test_trim_unused_params_drops_only_unread_parameters():
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2\n)\n"
           "{\n\tld.param.u64 %rd1, [k_param_0];\n\tld.param.u32 %r1, [k_param_1];\n}\n")
    trimmed = aot.trim_unused_params(ptx, keep=2)
    assert aot.entry_params(trimmed) == ["k_param_0", "k_param_1"]
    with pytest.raises(ValueError, match="reads its parameter k_param_1"):
        aot.trim_unused_params(ptx, keep=1)
    with pytest.raises(ValueError, match="fewer than the 4"):
        aot.trim_unused_params(ptx, keep=4)


def test_arch_arguments():
    assert aot.parse_arch(["87", "sm_90", "90"]) == [87, 90]
    with pytest.raises(UsageError, match=r"--arch 'hopper' is not a GPU target; expected a compute capability"):
        aot.parse_arch(["hopper"])
    with pytest.raises(UsageError, match=r"kernel dtype 'int8' is not supported"):
        aot.signature("int8")


def test_compiling_under_the_interpreter_is_refused():
    code = ("from milora.plugins import aot\n"
            "try:\n    aot.compile_kernel('float16', 1, 16, 90)\n"
            "except Exception as e:\n    import json; print(json.dumps({'type': type(e).__name__, 'msg': str(e)}))\n")
    got = run_json(["-c", code], interpret=True)
    assert got["type"] == DependencyError.__name__ and "unset it" in got["msg"]
