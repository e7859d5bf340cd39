"""Tactics, launch grids and kernel parameters of the routed LoRA kernel (milora.plugins.kernels),
as plain Python: shared by the PyTorch wrapper, the ahead-of-time compiler and the TensorRT
plugin, and tested without triton, torch or TensorRT.

Shape legend: B rows, T tokens per row, d_in / d_out the linear's input / output size,
S adapter slots, L layers, R the banks' (padded) rank, G gates per row (7).

A tactic is a block shape (TensorRT's plugin autotuner times each one on the build GPU and
keeps the fastest; the PyTorch wrapper picks one by a rule):

    block_t   tokens per program: 1 = the decode kernel (CUDA-core FMAs, no tensor-core tile
              of 16 rows to fill), >= 16 = the prefill kernel (tl.dot on tensor cores)
    block_n   output columns per program (the expand B[R, d_out] is split along d_out)
    block_k   input columns per step of the shrink loop over d_in
    num_warps, num_stages   as in Triton

Grid: (B, cdiv(T, block_t), cdiv(d_out, block_n)); every program of an inactive row (slot 0
or gate 0) stops after reading its slot and gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from milora.errors import RequestError

# Largest padded rank the kernels take: the shrink keeps a [block_t, R_PAD] fp32 accumulator and
# the expand a [R_PAD, block_n] tile in registers.
MAX_RANK = 256
# Register budget of one program's largest fp32 tile (elements): a [block_k, R_PAD] shrink step
# and a [R_PAD, block_n] expand tile are kept below this by shrinking block_k / block_n.
TILE_ELEMENTS = 16384
# float32 prefill tiles (CUDA-core "ieee" dots): output accumulator and A step, in elements.
FP32_ACC_ELEMENTS = 2048
FP32_A_ELEMENTS = 1024
# tl.dot needs every tile dimension >= 16.
MIN_DOT = 16


@dataclass(frozen=True)
class Tactic:
    block_t: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 2

    @property
    def decode(self) -> bool:
        return self.block_t == 1


# TensorRT tactic ids are the keys (non-zero ints); 1-3 are decode shapes, 4-6 prefill shapes.
# Any tactic is correct for any T (blocks are masked); the fastest depends on T and the GPU.
TACTICS: dict[int, Tactic] = {
    1: Tactic(block_t=1, block_n=128, block_k=128, num_warps=4),
    2: Tactic(block_t=1, block_n=256, block_k=256, num_warps=4),
    3: Tactic(block_t=1, block_n=512, block_k=128, num_warps=8),
    4: Tactic(block_t=16, block_n=64, block_k=64, num_warps=4),
    5: Tactic(block_t=32, block_n=128, block_k=64, num_warps=4, num_stages=3),
    6: Tactic(block_t=64, block_n=128, block_k=32, num_warps=8, num_stages=3),
}
DECODE_TACTICS = tuple(i for i, t in TACTICS.items() if t.decode)
PREFILL_TACTICS = tuple(i for i, t in TACTICS.items() if not t.decode)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def default_tactic(tokens: int) -> int:
    """The wrapper's rule when nobody timed the tactics: decode shapes for T < 16 (a 16-row
    tensor-core tile would be mostly padding), a 32-token prefill tile otherwise."""
    return 2 if tokens < MIN_DOT else 5


@dataclass(frozen=True)
class KernelParams:
    """The constexprs of one compiled kernel (milora.plugins.kernels.routed_lora_kernel)."""

    BLOCK_T: int
    BLOCK_N: int
    BLOCK_K: int
    R_PAD: int
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_T": self.BLOCK_T, "BLOCK_N": self.BLOCK_N, "BLOCK_K": self.BLOCK_K, "R_PAD": self.R_PAD}


def kernel_params(tactic: Tactic | int, rank: int, dtype: str = "float16") -> KernelParams:
    """Block sizes of a tactic fitted to a rank and dtype: R_PAD is the rank rounded up to a power
    of two (at least 16, tl.dot's minimum; columns r >= R are masked, so ranks that are not
    powers of two cost nothing extra in memory), and block_k / block_n shrink so no fp32 tile
    exceeds TILE_ELEMENTS (a rank-128 bank would otherwise spill registers). float32 prefill
    tiles shrink further: their exact ("ieee") dots run on CUDA cores and spilled registers at
    the fp16 sizes (ptxas -v, sm_90, rank 16: 320-368 bytes spilled by tactics 5-6, none with
    these limits; rank 64 still spills 1.7-15 KB: float32 engines are for validation, fp16 and
    bf16 ones for speed, and those spill nothing at ranks 16-64)."""
    t = TACTICS[tactic] if isinstance(tactic, int) else tactic
    if not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise RequestError(f"routed LoRA rank {rank!r} is out of range; expected 1..{MAX_RANK} (the banks' last "
                           f"axis of lora_A). Fix: export adapters of rank <= {MAX_RANK}")
    r_pad = max(MIN_DOT, next_pow2(rank))
    fit = max(MIN_DOT, TILE_ELEMENTS // r_pad)
    block_n, block_k = min(t.block_n, fit), min(t.block_k, fit)
    if dtype == "float32" and not t.decode:
        block_n = max(MIN_DOT, min(block_n, FP32_ACC_ELEMENTS // t.block_t))
        block_k = max(MIN_DOT, min(block_k, FP32_A_ELEMENTS // r_pad))
    return KernelParams(BLOCK_T=t.block_t, BLOCK_N=block_n, BLOCK_K=block_k, R_PAD=r_pad, num_warps=t.num_warps,
                        num_stages=t.num_stages)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grid(rows: int, tokens: int, d_out: int, params: KernelParams) -> tuple[int, int, int]:
    """(B, cdiv(T, BLOCK_T), cdiv(d_out, BLOCK_N)); CUDA caps grid y and z at 65535."""
    g = (rows, cdiv(tokens, params.BLOCK_T), cdiv(d_out, params.BLOCK_N))
    if g[1] > 65535 or g[2] > 65535:
        raise RequestError(f"routed LoRA launch grid {g} exceeds CUDA's 65535 blocks in y or z (T={tokens}, "
                           f"d_out={d_out}); expected T <= {65535 * params.BLOCK_T} and d_out <= "
                           f"{65535 * params.BLOCK_N}. Fix: use a prefill tactic (larger block_t) or fewer tokens")
    return g


# The kernel's runtime scalar arguments, in order (after the six input pointers, before the
# output pointer: TensorRT's ahead-of-time plugins call kernels as (inputs..., scalars...,
# outputs...)). Each is an int32.
SCALARS = ("B", "T", "D_IN", "D_OUT", "R", "S", "L", "G", "layer", "expert")


@dataclass(frozen=True)
class Problem:
    """One RoutedLora call's sizes, read from its input shapes (routed_lora.SPEC):
    x [B, T, d_in], base_out [B, T, d_out], lora_A [S, L, d_in, R], lora_B [S, L, R, d_out],
    tenant_slots [B], layer_gates [B, G]."""

    B: int
    T: int
    D_IN: int
    D_OUT: int
    R: int
    S: int
    L: int
    G: int
    layer: int
    expert: int

    def scalars(self) -> list[int]:
        return [getattr(self, n) for n in SCALARS]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def problem(shapes: list[tuple[int, ...]], layer: int, expert: int) -> Problem:
    """Check the six input shapes against each other (RequestError naming the first mismatch)
    and return the sizes the kernel takes."""
    check_ranks([len(s) for s in shapes])
    x, base, a, b, slots, gates = (tuple(int(d) for d in s) for s in shapes)
    bsz, t, d_in = x
    s, nl, a_in, r = a
    pairs = [("base_out [B, T]", base[:2], (bsz, t)), ("lora_A d_in", a_in, d_in),
             ("lora_B [S, L, R]", b[:3], (s, nl, r)), ("base_out d_out", base[2], b[3]),
             ("tenant_slots [B]", slots[0], bsz), ("layer_gates [B]", gates[0], bsz)]
    for what, seen, expected in pairs:
        if seen != expected:
            raise RequestError(f"RoutedLora inputs disagree: {what} is {seen}, expected {expected} from the other "
                               f"inputs (shapes {list(map(list, shapes))}). Fix: feed x [B,T,d_in], base_out "
                               "[B,T,d_out], lora_A [S,L,d_in,R], lora_B [S,L,R,d_out], tenant_slots [B], "
                               "layer_gates [B,7]")
    if not 0 <= layer < nl or not 0 <= expert < gates[1]:
        raise RequestError(f"RoutedLora layer={layer}, expert={expert} are out of range; expected layer in "
                           f"0..{nl - 1} and expert in 0..{gates[1] - 1} (the banks hold {nl} layers, the gates "
                           f"{gates[1]} experts)")
    return Problem(B=bsz, T=t, D_IN=d_in, D_OUT=base[2], R=r, S=s, L=nl, G=gates[1], layer=layer, expert=expert)


INPUT_RANKS = (3, 3, 4, 4, 1, 2)  # routed_lora.SPEC inputs, in order


def check_ranks(ranks: list[int]) -> None:
    from milora.plugins import op_spec as rl

    names = [n for n, _, _ in rl.SPEC["inputs"]]
    if len(ranks) != len(INPUT_RANKS):
        raise RequestError(f"RoutedLora takes {len(INPUT_RANKS)} inputs ({', '.join(names)}), got {len(ranks)}")
    bad = [f"{n} has rank {r}, expected {e}" for n, r, e in zip(names, ranks, INPUT_RANKS) if r != e]
    if bad:
        raise RequestError(f"RoutedLora input ranks are wrong: {'; '.join(bad)}. Fix: feed the tensors of "
                           "milora.export.routed_lora.SPEC")


def moved_bytes(p: Problem, active_rows: int, elem_bytes: int, in_place: bool = True) -> int:
    """Bytes the kernel must move when `active_rows` rows use the module: per active row its
    A and B slices, x, base_out and y; inactive rows nothing in place (else a base_out -> y copy).
    The floor a bandwidth figure is measured against (benchmarks/gpu_check.py)."""
    per_active = (p.D_IN * p.R + p.R * p.D_OUT + p.T * (p.D_IN + 2 * p.D_OUT)) * elem_bytes
    per_inactive = 0 if in_place else 2 * p.T * p.D_OUT * elem_bytes
    return active_rows * per_active + (p.B - active_rows) * per_inactive + p.B * (8 + 4)
