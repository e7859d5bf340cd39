"""Launch grids, tactics and kernel parameters of the routed LoRA kernel (milora.plugins.launch):
plain Python, no triton, torch or TensorRT."""

from __future__ import annotations

import pytest

from milora.errors import RequestError
from milora.export import routed_lora as rl
from milora.plugins import launch


def test_tactics_cover_decode_and_prefill_with_dot_sized_tiles():
    assert launch.DECODE_TACTICS and launch.PREFILL_TACTICS
    assert all(i > 0 for i in launch.TACTICS), "TensorRT tactic ids are non-zero"
    for i in launch.PREFILL_TACTICS:
        t = launch.TACTICS[i]
        assert t.block_t >= launch.MIN_DOT and t.block_n >= launch.MIN_DOT and t.block_k >= launch.MIN_DOT
    for t in launch.TACTICS.values():
        for v in (t.block_t, t.block_n, t.block_k, t.num_warps):
            assert v & (v - 1) == 0, f"{t}: Triton block sizes are powers of two"


@pytest.mark.parametrize("rank, r_pad", [(1, 16), (3, 16), (16, 16), (17, 32), (20, 32), (64, 64), (65, 128),
                                          (256, 256)])
def test_rank_is_padded_to_a_power_of_two_of_at_least_16(rank, r_pad):
    for tactic in launch.TACTICS:
        for dtype in ("float16", "bfloat16", "float32"):
            p = launch.kernel_params(tactic, rank, dtype)
            assert p.R_PAD == r_pad
            assert p.BLOCK_K * p.R_PAD <= max(launch.TILE_ELEMENTS, launch.MIN_DOT * p.R_PAD)
            assert p.R_PAD * p.BLOCK_N <= max(launch.TILE_ELEMENTS, launch.MIN_DOT * p.R_PAD)
            assert min(p.BLOCK_N, p.BLOCK_K) >= launch.MIN_DOT
            assert p.constexprs() == {"BLOCK_T": p.BLOCK_T, "BLOCK_N": p.BLOCK_N, "BLOCK_K": p.BLOCK_K, "R_PAD": r_pad}


def test_float32_prefill_tiles_are_smaller():
    for tactic in launch.PREFILL_TACTICS:
        p16, p32 = launch.kernel_params(tactic, 16, "float16"), launch.kernel_params(tactic, 16, "float32")
        assert p32.BLOCK_T == p16.BLOCK_T and p32.BLOCK_T * p32.BLOCK_N <= launch.FP32_ACC_ELEMENTS
    assert launch.kernel_params(1, 16, "float32") == launch.kernel_params(1, 16, "float16")


@pytest.mark.parametrize("rank", [0, 257, 2.5, None])
def test_rank_out_of_range(rank):
    with pytest.raises(RequestError, match=rf"rank {rank!r} is out of range; expected 1..256"):
        launch.kernel_params(1, rank)


def test_default_tactic_is_decode_below_a_dot_tile():
    assert launch.TACTICS[launch.default_tactic(1)].decode
    assert launch.TACTICS[launch.default_tactic(15)].decode
    assert not launch.TACTICS[launch.default_tactic(16)].decode


def test_grid_covers_every_row_token_and_column():
    p = launch.kernel_params(5, 16)  # block_t 32, block_n 128
    assert launch.grid(3, 1, 4096, p) == (3, 1, 32)
    assert launch.grid(3, 33, 4097, p) == (3, 2, 33)
    assert launch.grid(0, 1, 8, p) == (0, 1, 1)
    with pytest.raises(RequestError, match=r"exceeds CUDA's 65535 blocks"):
        launch.grid(1, 65536 * 32 + 1, 64, p)


def shapes(B=4, T=3, d_in=32, d_out=48, S=5, L=2, R=8, G=7):
    return [(B, T, d_in), (B, T, d_out), (S, L, d_in, R), (S, L, R, d_out), (B,), (B, G)]


def test_problem_reads_the_sizes_from_the_op_inputs():
    p = launch.problem(shapes(), layer=1, expert=6)
    assert p.as_dict() == {"B": 4, "T": 3, "D_IN": 32, "D_OUT": 48, "R": 8, "S": 5, "L": 2, "G": 7, "layer": 1,
                           "expert": 6}
    assert p.scalars() == [4, 3, 32, 48, 8, 5, 2, 7, 1, 6]
    assert len(launch.SCALARS) == len(p.scalars())


def test_the_kernel_takes_the_op_inputs_in_spec_order():
    from milora.plugins.aot import POINTERS_IN, signature

    assert len(POINTERS_IN) == len(rl.SPEC["inputs"]) == len(launch.INPUT_RANKS)
    sig = list(signature("float16"))
    assert sig[:6] == list(POINTERS_IN) and sig[6:16] == list(launch.SCALARS) and sig[16] == "y_ptr"


@pytest.mark.parametrize("index, bad, message", [
    (1, (4, 2, 48), r"base_out \[B, T\] is \(4, 2\), expected \(4, 3\)"),
    (2, (5, 2, 31, 8), r"lora_A d_in is 31, expected 32"),
    (3, (5, 2, 9, 48), r"lora_B \[S, L, R\] is \(5, 2, 9\), expected \(5, 2, 8\)"),
    (3, (5, 2, 8, 47), r"base_out d_out is 48, expected 47"),
    (4, (3,), r"tenant_slots \[B\] is 3, expected 4"),
    (5, (5, 7), r"layer_gates \[B\] is 5, expected 4"),
    (0, (4, 3), r"x has rank 2, expected 3"),
])
def test_problem_names_the_first_mismatch(index, bad, message):
    s = shapes()
    s[index] = bad
    with pytest.raises(RequestError, match=message):
        launch.problem(s, 0, 0)


def test_problem_refuses_layer_and_expert_outside_the_banks():
    with pytest.raises(RequestError, match=r"layer=2, expert=0 are out of range; expected layer in 0..1"):
        launch.problem(shapes(), 2, 0)
    with pytest.raises(RequestError, match=r"expert in 0..6"):
        launch.problem(shapes(), 0, 7)
    with pytest.raises(RequestError, match=r"takes 6 inputs"):
        launch.check_ranks([3, 3, 4])


def test_moved_bytes_counts_active_rows_only_in_place():
    p = launch.problem(shapes(B=32, T=1, d_in=4096, d_out=4096, R=16), 0, 0)
    per_row = (4096 * 16 * 2 + 1 * (4096 * 3)) * 2
    assert launch.moved_bytes(p, 5, 2) == 5 * per_row + 32 * 12
    assert launch.moved_bytes(p, 5, 2, in_place=False) == 5 * per_row + 27 * 2 * 4096 * 2 + 32 * 12
    assert launch.moved_bytes(p, 0, 2) == 32 * 12
