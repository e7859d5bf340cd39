"""Checks of the routed LoRA Triton kernel (milora.plugins.kernels) in the Triton interpreter,
run by tests/test_plugins_kernels.py in a subprocess: TRITON_INTERPRET must be set before
anything imports triton.language, which a pytest process cannot promise (transformers imports
triton). Each check_* raises AssertionError on failure; main() prints {name: "ok" | traceback}.

    TRITON_INTERPRET=1 python tests/plugins_kernel_checks.py [names...]
"""

from __future__ import annotations

import json
import random
import sys
import traceback

import torch

from milora.errors import RequestError
from milora.export.routed_lora import routed_lora_reference
from milora.plugins import launch
from plugins_helpers import make_problem

ops = None  # milora.plugins.torch_ops, imported by main() under the interpreter
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Two units in the last place of the output dtype, relative and absolute (outputs are ~N(0, 1)):
# the kernel accumulates in float32, the contract in float64, both round once to the dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class raises:
    """pytest.raises without pytest (this module runs in a plain subprocess)."""

    def __init__(self, exc, match):
        self.exc, self.match = exc, match

    def __enter__(self):
        return self

    def __exit__(self, typ, value, tb):
        import re

        assert typ is not None, f"{self.exc.__name__} not raised"
        assert issubclass(typ, self.exc), f"raised {typ.__name__}: {value}"
        assert re.search(self.match, str(value)), f"{str(value)!r} does not match {self.match!r}"
        return True


def bits(t):
    """The exact bit patterns of a tensor (comparing them is equality that sees -0.0 and NaN payloads)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_matches_contract(y, args, layer, expert):
    want = ops.plugin_contract(*args, layer, expert)
    tol = TOL[y.dtype]
    torch.testing.assert_close(y.float(), want.float(), atol=tol, rtol=tol, equal_nan=True)


def random_case(seed):
    rng = random.Random(seed)
    dtype = rng.choice(list(DTYPES.values()))
    shape = dict(B=rng.randint(1, 6), T=rng.choice([1, 1, 2, 5, 17, 33]), d_in=rng.randint(5, 80),
                 d_out=rng.randint(5, 80), R=rng.choice([1, 3, 5, 7, 16, 17, 20]), S=rng.randint(2, 4),
                 L=rng.randint(1, 3))
    args = make_problem(seed, **shape, dtype=dtype, active=rng.random())
    layer, expert = rng.randrange(shape["L"]), rng.randrange(7)
    tactic = rng.choice([None, *launch.TACTICS])
    return args, layer, expert, tactic, rng.random() < 0.5


def random_shapes(seed):
    args, layer, expert, tactic, in_place = random_case(seed)
    base_before = args[1].clone()
    if in_place:
        y = ops.routed_lora_(args[0], args[1].clone(), *args[2:], layer, expert, tactic=tactic)
    else:
        y = ops.routed_lora(*args, layer, expert, tactic=tactic)
        assert torch.equal(bits(args[1]), bits(base_before)), "routed_lora must not write its input"
    assert y.shape == args[1].shape and y.dtype == args[1].dtype
    assert_matches_contract(y, args, layer, expert)


def check_contract_is_the_reference_on_healthy_inputs():
    """Skipping slot-0 and gate-0 rows changes nothing where the banks are finite and slot 0 is
    zero: the kernel's contract is routed_lora_reference's maths."""
    for seed in range(4):
        args = make_problem(seed, B=5, T=3, d_in=12, d_out=10, R=3)
        torch.testing.assert_close(ops.plugin_contract(*args, 1, 2), routed_lora_reference(*args, 1, 2),
                                   atol=1e-6, rtol=1e-6)


def kernel_matches_the_reference(dtype):
    x, base, a, b, slots, gates = make_problem(7, B=6, T=4, d_in=40, d_out=24, R=6, dtype=DTYPES[dtype])
    want = routed_lora_reference(x.double(), base.double(), a.double(), b.double(), slots, gates.double(), 1, 4)
    for tactic in (1, 4):
        y = ops.routed_lora(x, base, a, b, slots, gates, 1, 4, tactic=tactic)
        tol = TOL[DTYPES[dtype]]
        torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol)


def no_active_row(tactic):
    x, base, a, b, slots, gates = make_problem(1, B=4, T=3, d_in=20, d_out=18, R=4, dtype=torch.float16)
    gates[:, 2] = 0
    x[:] = float("nan")  # never read: an inactive row reads its slot and gate only
    base[0, 0, 0] = -0.0
    y = ops.routed_lora(x, base, a, b, slots, gates, 0, 2, tactic=tactic)
    assert torch.equal(bits(y), bits(base))
    z = base.clone()
    ops.routed_lora_(x, z, a, b, slots, gates, 0, 2, tactic=tactic)
    assert torch.equal(bits(z), bits(base))


def check_all_rows_active():
    x, base, a, b, slots, gates = make_problem(2, B=5, T=2, d_in=30, d_out=22, R=5, active=1.0)
    slots[:] = torch.tensor([1, 2, 1, 2, 2])
    y = ops.routed_lora(x, base, a, b, slots, gates, 1, 6)
    assert (y != base).any(dim=(1, 2)).all(), "every row uses the module, every row changes"
    assert_matches_contract(y, (x, base, a, b, slots, gates), 1, 6)


def one_row_one_token(dtype):
    x, base, a, b, slots, gates = make_problem(3, B=1, T=1, d_in=9, d_out=11, R=3, dtype=DTYPES[dtype], active=1.0)
    slots[:] = 1
    y = ops.routed_lora(x, base, a, b, slots, gates, 0, 0)
    assert_matches_contract(y, (x, base, a, b, slots, gates), 0, 0)
    assert not torch.equal(y, base)


def check_nan_in_one_tenants_bank_stays_in_its_rows():
    x, base, a, b, slots, gates = make_problem(4, B=6, T=3, d_in=16, d_out=20, R=4, S=3, active=1.0)
    slots[:] = torch.tensor([2, 1, 2, 0, 1, 2])
    gates[5, 3] = 0  # a row of the corrupt tenant that does not use this module
    a[2, 1, 5, 1] = float("nan")
    y = ops.routed_lora(x, base, a, b, slots, gates, 1, 3)
    for row in (0, 2):
        assert torch.isnan(y[row]).any()
    healthy = [1, 3, 4, 5]
    assert torch.isfinite(y[healthy]).all()
    want = ops.plugin_contract(x, base, a, b, slots, gates, 1, 3)
    torch.testing.assert_close(y[healthy], want[healthy], atol=2e-5, rtol=2e-5)
    assert torch.equal(bits(y[[3, 5]]), bits(base[[3, 5]]))


def check_nan_gate_is_on_and_stays_in_its_row():
    x, base, a, b, slots, gates = make_problem(5, B=4, T=2, d_in=14, d_out=9, R=3, active=1.0)
    slots[:] = torch.tensor([1, 2, 0, 1])
    gates[0, 5] = float("nan")  # a NaN gate is not "off": row 0 computes, and is NaN
    gates[2, 5] = float("nan")  # slot 0 is the base model: skipped whatever its gate
    y = ops.routed_lora(x, base, a, b, slots, gates, 0, 5)
    assert torch.isnan(y[0]).all()
    assert torch.equal(bits(y[2]), bits(base[2]))
    want = ops.plugin_contract(x, base, a, b, slots, gates, 0, 5)
    torch.testing.assert_close(y[[1, 3]], want[[1, 3]], atol=2e-5, rtol=2e-5)


def slot_zero_rows(dtype):
    x, base, a, b, slots, gates = make_problem(6, B=5, T=3, d_in=10, d_out=13, R=2, dtype=DTYPES[dtype], active=1.0)
    slots[:] = torch.tensor([0, 1, 0, 2, 0])
    base[0, 0, :3] = torch.tensor([-0.0, 1e-40, -1e-45]).to(base.dtype)  # signed zero and denormals survive
    for tactic in (2, 4):
        y = ops.routed_lora(x, base, a, b, slots, gates, 1, 1, tactic=tactic)
        assert torch.equal(bits(y[[0, 2, 4]]), bits(base[[0, 2, 4]]))
        assert not torch.equal(y[[1, 3]], base[[1, 3]])


def check_in_place_touches_only_active_rows():
    x, base, a, b, slots, gates = make_problem(8, B=6, T=2, d_in=24, d_out=40, R=5, active=1.0)
    slots[:] = torch.tensor([1, 0, 2, 1, 0, 2])
    gates[2, 0] = 0
    inactive = [1, 2, 4]
    x[inactive] = float("nan")
    z = base.clone()
    out = ops.routed_lora_(x, z, a, b, slots, gates, 0, 0)
    assert out is z
    assert torch.equal(bits(z[inactive]), bits(base[inactive]))
    assert_matches_contract(z, (x, base, a, b, slots, gates), 0, 0)


def check_out_of_range_slot_fails_only_its_row():
    x, base, a, b, slots, gates = make_problem(9, B=3, T=2, d_in=8, d_out=8, R=2, S=3, active=1.0)
    slots[:] = torch.tensor([1, 3, 2])  # 3 >= S: never fed by milora's runtimes, which check slots
    y = ops.routed_lora(x, base, a, b, slots, gates, 0, 1)
    assert torch.isnan(y[1]).all()
    torch.testing.assert_close(y[[0, 2]], ops.plugin_contract(x, base, a, b, slots.clamp(max=2), gates, 0, 1)[[0, 2]],
                               atol=2e-5, rtol=2e-5)


def check_out_parameter():
    """The TensorRT plugin's just-in-time path writes into TensorRT's output buffer: a separate
    tensor (out of place) or base_out itself (aliased, in place)."""
    x, base, a, b, slots, gates = make_problem(11, B=4, T=2, d_in=12, d_out=10, R=3, active=1.0)
    slots[:] = torch.tensor([1, 0, 2, 1])
    out = torch.full_like(base, 7.0)
    assert ops.routed_lora(x, base, a, b, slots, gates, 1, 2, out=out) is out
    assert_matches_contract(out, (x, base, a, b, slots, gates), 1, 2)
    same = base.clone()
    ops.routed_lora(x, same, a, b, slots, gates, 1, 2, out=same)
    torch.testing.assert_close(same, out, atol=0, rtol=0)
    with raises(RequestError, match=r"out must be a contiguous torch.float32 tensor of shape \[4, 2, 10\]"):
        ops.routed_lora(x, base, a, b, slots, gates, 1, 2, out=out[:, :1])


def check_bad_inputs_are_request_errors():
    x, base, a, b, slots, gates = make_problem(10, B=2, T=2, d_in=8, d_out=6, R=2)
    with raises(RequestError, match=r"base_out d_out is 6, expected 7"):
        ops.routed_lora(x, base, a, torch.zeros(*b.shape[:3], 7), slots, gates, 0, 0)
    with raises(RequestError, match=r"share one dtype.*'lora_a': torch.float16"):
        ops.routed_lora(x, base, a.half(), b, slots, gates, 0, 0)
    with raises(RequestError, match=r"slots must be int64 and layer_gates float32.*torch.int32"):
        ops.routed_lora(x, base, a, b, slots.int(), gates, 0, 0)
    with raises(RequestError, match=r"layer=5, expert=0 are out of range; expected layer in 0..1"):
        ops.routed_lora(x, base, a, b, slots, gates, 5, 0)
    with raises(RequestError, match=r"x has rank 2, expected 3"):
        ops.routed_lora(x[0], base, a, b, slots, gates, 0, 0)
    with raises(RequestError, match="must be contiguous"):
        ops.routed_lora_(x, base.transpose(0, 1), a, b, slots, gates, 0, 0)


CHECKS = {f"check_random_shapes_match_the_contract_{s}": (random_shapes, s) for s in range(24)}
CHECKS.update({f"check_kernel_matches_the_reference_{d}": (kernel_matches_the_reference, d) for d in DTYPES})
CHECKS.update({f"check_no_active_row_is_base_out_bit_for_bit_tactic{t}": (no_active_row, t) for t in (1, 5)})
CHECKS.update({f"check_one_row_one_token_{d}": (one_row_one_token, d) for d in DTYPES})
CHECKS.update({f"check_slot_zero_rows_untouched_bit_for_bit_{d}": (slot_zero_rows, d) for d in DTYPES})
CHECKS.update({name: (fn, None) for name, fn in list(globals().items()) if name.startswith("check_") and callable(fn)})


def main(names: list[str]) -> None:
    global ops
    from milora.plugins import torch_ops

    ops = torch_ops
    assert ops.interpreted(), "run with TRITON_INTERPRET=1"
    results = {}
    for name in names or CHECKS:
        fn, arg = CHECKS[name]
        try:
            fn() if arg is None else fn(arg)
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - every failure is reported to the test by name
            results[name] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
