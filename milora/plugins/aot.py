"""Ahead-of-time compilation of the routed LoRA kernel to PTX and cubin, without a GPU.

    art = compile_kernel("float16", tactic=2, rank=16, capability=90)    # one kernel
    write_artefacts(out_dir, capabilities=[87, 90, newest_capability()])  # files + aot.json
    python -m milora.plugins.aot OUT_DIR [--arch 87 90 newest] [--dtype float16 ...] [--rank 16]

sm_87 is Jetson Orin, sm_90 Hopper (Triton emits sm_90a), newest_capability() the newest
target the pinned Triton's ptxas knows. Must run in a process WITHOUT TRITON_INTERPRET (the
interpreter replaces the kernel at import); triton's API for this changes between versions,
which is why triton is pinned.

TensorRT's ahead-of-time plugins launch a kernel with its arguments in the order (input
pointers, int32 scalars, output pointers). Triton appends two pointer parameters of its own
(global and profile scratch); our kernel uses neither (their sizes are 0, checked), so
trim_unused_params removes them from the PTX entry: the entry then takes exactly what
TensorRT passes. The trimmed PTX is assembled again with Triton's ptxas to prove it is valid.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from milora.errors import DependencyError, UsageError
from milora.plugins import launch

# Triton pointer types of the data dtypes (x, base_out, lora_A, lora_B, y share one).
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
POINTERS_IN = ("x_ptr", "base_ptr", "a_ptr", "b_ptr", "slots_ptr", "gates_ptr")
POINTER_OUT = "y_ptr"
JETSON_ORIN, HOPPER = 87, 90


def _triton():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise DependencyError("ahead-of-time compilation cannot run with TRITON_INTERPRET=1 (the interpreter replaces "
                              "the kernel); unset it and run again (e.g. env -u TRITON_INTERPRET ...)")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        raise DependencyError(f"ahead-of-time compilation needs triton ({exc}); install it with "
                              "pip install 'milora[kernels]' (triton==3.9.0, installs on CPU too)") from None
    return triton, ASTSource, GPUTarget


def signature(dtype: str) -> dict[str, str]:
    """Triton signature of the kernel's runtime arguments (constexprs are added by compile_kernel)."""
    if dtype not in TRITON_TYPES:
        raise UsageError(f"kernel dtype {dtype!r} is not supported; expected one of {', '.join(TRITON_TYPES)}")
    p = f"*{TRITON_TYPES[dtype]}"
    sig = {"x_ptr": p, "base_ptr": p, "a_ptr": p, "b_ptr": p, "slots_ptr": "*i64", "gates_ptr": "*fp32"}
    sig.update({name: "i32" for name in launch.SCALARS})
    sig[POINTER_OUT] = p
    return sig


def divisibility_hints(sig: dict[str, str], divisible: dict[str, int] | None = None) -> dict[tuple[int], list]:
    """tt.divisibility 16 on every pointer (TensorRT and PyTorch allocations are 256-byte aligned)
    and on the scalars known to be multiples of 16 (d_in, d_out of real models: lets Triton
    vectorize the loads along them)."""
    names = list(sig)
    hinted = [n for n, t in sig.items() if t.startswith("*")]
    hinted += [n for n, v in (divisible or {}).items() if v % 16 == 0]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}


@dataclass
class Artefact:
    """One compiled kernel: what TensorRT's aot_impl returns (name, PTX, launch shape) and the
    cubin and metadata the CI checks."""

    name: str
    ptx: str  # trimmed: exactly the parameters TensorRT passes
    cubin: bytes
    capability: int
    dtype: str
    tactic: int
    params: launch.KernelParams
    shared: int
    num_warps: int
    num_stages: int
    entry_params: list[str] = field(default_factory=list)
    triton_version: str = ""
    registers: int | None = None
    spill_bytes: int = 0

    def metadata(self) -> dict:
        target = re.search(r"\.target\s+(\w+)", self.ptx)
        return {"name": self.name, "capability": self.capability, "target": target.group(1) if target else None,
                "dtype": self.dtype, "tactic": self.tactic, "constexprs": self.params.constexprs(),
                "shared_memory_bytes": self.shared, "num_warps": self.num_warps, "num_stages": self.num_stages,
                "block_threads": self.num_warps * 32, "entry_params": len(self.entry_params),
                "registers": self.registers, "spill_bytes": self.spill_bytes,
                "ptx_bytes": len(self.ptx), "cubin_bytes": len(self.cubin), "triton": self.triton_version}


def compile_kernel(dtype: str, tactic: int, rank: int, capability: int,
                   divisible: dict[str, int] | None = None) -> Artefact:
    """Compile routed_lora_kernel for one (dtype, tactic, padded rank, GPU) without a GPU."""
    triton, ast_source, gpu_target = _triton()
    from milora.plugins.kernels import routed_lora_kernel

    sig = signature(dtype)
    params = launch.kernel_params(tactic, rank, dtype)
    attrs = divisibility_hints(sig, divisible)
    constexprs = dict(params.constexprs(), DOT_F32=False)
    full_sig = dict(sig, **{k: "constexpr" for k in constexprs})
    src = ast_source(fn=routed_lora_kernel, signature=full_sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=gpu_target("cuda", capability, 32),
                              options={"num_warps": params.num_warps, "num_stages": params.num_stages,
                                       "enable_fp_fusion": True})
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise DependencyError(f"triton {triton.__version__} compiled routed_lora_kernel with scratch memory "
                              f"(global {md.global_scratch_size}, profile {md.profile_scratch_size} bytes), which "
                              "TensorRT's ahead-of-time plugins cannot provide; use the pinned triton (3.9.0)")
    ptx = trim_unused_params(compiled.asm["ptx"], keep=len(sig))
    # The cubin of the trimmed PTX, not Triton's: the artefacts stay one kernel, and assembling
    # proves the trimmed entry is valid PTX for the target.
    cubin, usage = assemble(ptx, capability)
    return Artefact(name=md.name, ptx=ptx, cubin=cubin, capability=capability, dtype=dtype, tactic=tactic,
                    params=params, shared=int(md.shared), num_warps=int(md.num_warps), num_stages=params.num_stages,
                    entry_params=entry_params(ptx), triton_version=triton.__version__, **usage)


_ENTRY = re.compile(r"(\.visible\s+\.entry\s+\w+\s*\()(.*?)(\))", re.S)


def entry_params(ptx: str) -> list[str]:
    """Parameter names of the PTX entry, in order."""
    m = _ENTRY.search(ptx)
    if m is None:
        raise ValueError("no .visible .entry in the PTX")
    return [d.split()[-1] for d in m.group(2).split(",") if d.strip()]


def trim_unused_params(ptx: str, keep: int) -> str:
    """Drop the entry's parameters after the first `keep` (Triton's scratch pointers), after
    checking that the body never reads them (so dropping them cannot change the code)."""
    m = _ENTRY.search(ptx)
    if m is None:
        raise ValueError("no .visible .entry in the PTX")
    decls = [d.strip() for d in m.group(2).split(",") if d.strip()]
    if len(decls) < keep:
        raise ValueError(f"the PTX entry has {len(decls)} parameters, fewer than the {keep} TensorRT passes")
    body = ptx[m.end():]
    for d in decls[keep:]:
        name = d.split()[-1]
        if re.search(rf"\b{re.escape(name)}\b", body):
            raise ValueError(f"the kernel reads its parameter {name}; it cannot be dropped")
    return ptx[:m.start(2)] + "\n\t" + ",\n\t".join(decls[:keep]) + "\n" + ptx[m.end(2):]


def ptxas_path(capability: int) -> str:
    """Triton's bundled ptxas for a target (its Blackwell build for sm_90 and newer)."""
    from triton import knobs

    tool = knobs.nvidia.ptxas if capability < 90 else knobs.nvidia.ptxas_blackwell
    return tool.path


def assemble(ptx: str, capability: int) -> tuple[bytes, dict]:
    """Assemble PTX to a cubin with Triton's ptxas (what the CUDA driver does with the PTX that
    TensorRT embeds): (cubin, {"registers", "spill_bytes"} from ptxas -v)."""
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    with tempfile.TemporaryDirectory(prefix="milora-ptxas-") as work:
        src, out = Path(work) / "kernel.ptx", Path(work) / "kernel.cubin"
        src.write_text(ptx)
        proc = subprocess.run([ptxas_path(capability), "-v", f"--gpu-name={arch}", str(src), "-o", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ValueError(f"ptxas rejected the PTX for {arch}: {proc.stderr.strip()[:500]}")
        cubin = out.read_bytes()
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr)]
    return cubin, {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills)}


def newest_capability() -> int:
    """The newest sm_NNN the pinned Triton's ptxas accepts (parsed from its --help)."""
    _triton()
    text = subprocess.run([ptxas_path(100), "--help"], capture_output=True, text=True).stdout
    caps = [int(c) for c in re.findall(r"'sm_(\d+)[af]?'", text)]
    if not caps:
        raise DependencyError("cannot read the GPU targets of triton's ptxas (--help lists none); reinstall triton")
    return max(caps)


def parse_arch(values: list[str]) -> list[int]:
    caps = []
    for v in values:
        if v == "newest":
            caps.append(newest_capability())
            continue
        digits = v.lower().removeprefix("sm_")
        if not digits.isdigit() or not 70 <= int(digits) <= 199:
            raise UsageError(f"--arch {v!r} is not a GPU target; expected a compute capability such as 87 (Jetson "
                             "Orin), 90 (Hopper), sm_100, or 'newest'")
        caps.append(int(digits))
    return list(dict.fromkeys(caps))


def write_artefacts(out_dir: str | Path, capabilities: list[int], dtypes=("float16", "bfloat16", "float32"),
                    tactics=tuple(launch.TACTICS), rank: int = 16) -> dict:
    """Compile every (capability, dtype, tactic), write <kernel>.sm<cap>.<dtype>.t<tactic>.ptx /
    .cubin and aot.json (their metadata); returns that document."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kernels = []
    for cap in capabilities:
        for dtype in dtypes:
            for tactic in tactics:
                art = compile_kernel(dtype, tactic, rank, cap)
                stem = f"{art.name}.sm{cap}.{dtype}.t{tactic}"
                (out / f"{stem}.ptx").write_text(art.ptx)
                (out / f"{stem}.cubin").write_bytes(art.cubin)
                kernels.append(dict(art.metadata(), ptx=f"{stem}.ptx", cubin=f"{stem}.cubin"))
    doc = {"kernel": "routed_lora_kernel", "rank": rank, "kernels": kernels}
    (out / "aot.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main(argv: list[str] | None = None) -> int:
    from milora.cli_errors import ArgumentParser, cli_main

    @cli_main("milora-plugins-aot")
    def run(argv):
        p = ArgumentParser(prog="python -m milora.plugins.aot",
                           description="Compile the routed LoRA kernel to PTX and cubin for GPU targets (no GPU needed).")
        p.add_argument("out_dir", type=Path)
        p.add_argument("--arch", nargs="+", default=[str(JETSON_ORIN), str(HOPPER), "newest"])
        p.add_argument("--dtype", nargs="+", default=["float16", "bfloat16", "float32"], choices=list(TRITON_TYPES))
        p.add_argument("--tactic", nargs="+", type=int, default=list(launch.TACTICS), choices=list(launch.TACTICS))
        p.add_argument("--rank", type=int, default=16)
        args = p.parse_args(argv)
        doc = write_artefacts(args.out_dir, parse_arch(args.arch), args.dtype, args.tactic, args.rank)
        print(f"wrote {len(doc['kernels'])} kernels to {args.out_dir} (aot.json lists them)")
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
