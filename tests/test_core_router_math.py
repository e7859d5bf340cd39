"""The router against hand computation (docs/method.md, "The router" and "Training").

Every expected number here is computed in plain Python from the definitions in docs/method.md
(lists and the math module), never by calling the code under test. Masked positions hold
garbage, inf and nan included: a router that excluded them by multiplying with a 0/1 mask
would turn them into nan, so these tests prove selection.
"""

from __future__ import annotations

import math

import pytest
import torch

from milora.format.config import MiloraConfig
from milora.model.losses import cv2_loss, load_balancing_loss, switch_loss
from milora.model.router import MiloraRouter, top_k_gates

pytestmark = pytest.mark.core

E = 7
D = 3
# docs/method.md's GELU and ReLU initialisations of the (5, 4) "safe" Pade unit, typed from the doc.
GELU_A = (-4.2211e-4, 0.49999956, 0.40270535, 0.07366977, -0.01295479, -0.00374140)
GELU_B = (4.9585e-5, 0.14729774, 1.1646e-5, -0.00748387)
RELU_A = (0.03389713, 0.49999854, 1.67013636, 1.99010216, 0.94130896, 0.15091334)
RELU_B = (-2.1040e-5, 3.98024785, -3.1663e-5, 0.30183382)

NAN, INF = float("nan"), float("inf")
# Two rows of four tokens, d = 3. Row 0 is left padded (positions 0 masked), row 1 has a
# masked hole and a masked tail. Masked positions hold garbage, including inf and nan.
HIDDEN = [
    [[NAN, INF, -INF], [0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-2.0, 1.0, 0.75]],
    [[1.0, 2.0, -1.0], [1e30, NAN, 7.0], [0.0, -0.5, 3.0], [INF, INF, NAN]],
]
MASK = [[False, True, True, True], [True, False, True, False]]
W_SA = [0.3, -0.7, 0.2]  # attention pooler vector
W_R = [[0.5, -1.0, 0.25], [1.0, 0.5, -0.5], [-0.75, 0.2, 1.0], [0.1, 0.1, 0.1],
       [-1.0, -0.3, 0.6], [0.0, 1.5, -0.2], [0.4, -0.4, 0.8]]  # router weight [E, d]


# ---- hand references (plain Python) ----

def hand_rational(x: float, a=GELU_A, b=GELU_B) -> float:
    p = sum(c * x**i for i, c in enumerate(a))
    q = sum(c * x ** (j + 1) for j, c in enumerate(b))
    return p / (1.0 + abs(q))


def hand_act(x: float, kind: str) -> float:
    if kind == "rational":
        return hand_rational(x)
    if kind == "gelu":
        return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))
    if kind == "relu":
        return max(x, 0.0)
    return x


def hand_pool(tokens: list[list[float]], kind: str) -> list[float]:
    """tokens: the unmasked rows only."""
    if kind == "last":
        return list(tokens[-1])
    if kind == "mean":
        return [sum(t[i] for t in tokens) / len(tokens) for i in range(D)]
    if kind == "max":
        return [max(t[i] for t in tokens) for i in range(D)]
    scores = [sum(w * v for w, v in zip(W_SA, t)) for t in tokens]
    m = max(scores)
    ex = [math.exp(s - m) for s in scores]
    a = [e / sum(ex) for e in ex]
    return [sum(a[j] * tokens[j][i] for j in range(len(tokens))) for i in range(D)]


def hand_logits(row: int, pooler: str, act: str, position: str) -> list[float]:
    tokens = [t for t, keep in zip(HIDDEN[row], MASK[row]) if keep]
    if position == "pre_pool":
        tokens = [[hand_act(v, act) for v in t] for t in tokens]
        pooled = hand_pool(tokens, pooler)
    else:
        pooled = [hand_act(v, act) for v in hand_pool(tokens, pooler)]
    return [sum(w * v for w, v in zip(W_R[e], pooled)) for e in range(E)]


def hand_softmax(z: list[float]) -> list[float]:
    m = max(z)
    ex = [math.exp(v - m) for v in z]
    return [v / sum(ex) for v in ex]


def hand_top_k(z: list[float], k: int) -> list[int]:
    # Larger logit first; on equal logits the lower index first (docs/method.md, "Top-k and ties").
    return sorted(range(len(z)), key=lambda i: (-z[i], i))[:k]


def hand_gates(z: list[float], k: int, mode: str) -> list[float]:
    chosen = hand_top_k(z, k)
    if mode == "paper":
        p = hand_softmax(z)
        return [p[i] if i in chosen else 0.0 for i in range(len(z))]
    sub = hand_softmax([z[i] for i in chosen])
    out = [0.0] * len(z)
    for i, g in zip(chosen, sub):
        out[i] = g
    return out


def make_router(**options) -> MiloraRouter:
    cfg = MiloraConfig(rank=2, alpha=2, **options)
    router = MiloraRouter(D, cfg).eval()
    with torch.no_grad():
        router.weight.copy_(torch.tensor(W_R))
        if router.pooler is not None:
            router.pooler.copy_(torch.tensor(W_SA))
    return router


def got_at(router: MiloraRouter, x: float) -> float:
    from milora.model.router import rational

    return rational(torch.tensor([x], dtype=torch.float64), router.act_num.double(), router.act_den.double()).item()


# ---- tests ----

def test_rational_activation_matches_hand_polynomial():
    router = make_router(activation="rational", pooler="last")
    xs = [-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0]
    # At x = 1 the unit is sum(a) / (1 + |sum(b)|): a number one can check on paper.
    assert hand_rational(1.0) == pytest.approx(sum(GELU_A) / (1 + abs(sum(GELU_B))), rel=1e-12)
    # R(0) = a0 != 0: why pre_pool masking must happen after the activation.
    assert hand_rational(0.0) == pytest.approx(GELU_A[0])
    from milora.model.router import rational

    got = rational(torch.tensor(xs, dtype=torch.float64), router.act_num.double(), router.act_den.double())
    assert got.tolist() == pytest.approx([hand_rational(x) for x in xs], rel=1e-6, abs=1e-7)  # coefficients are stored in fp32
    # The GELU initialisation tracks GELU closely on [-3, 3] (docs/method.md);
    # a wrong coefficient order or sign would not.
    for x in (-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0):
        assert float(got_at(router, x)) == pytest.approx(hand_act(x, "gelu"), abs=2e-3)


def test_rational_relu_init_is_the_published_one():
    router = make_router(activation="rational", rational_init="relu")
    xs = [-2.0, -0.5, 0.5, 2.0]
    from milora.model.router import rational

    got = rational(torch.tensor(xs, dtype=torch.float64), router.act_num.double(), router.act_den.double())
    assert got.tolist() == pytest.approx([hand_rational(x, RELU_A, RELU_B) for x in xs], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("position", ["post_pool", "pre_pool"])
@pytest.mark.parametrize("act", ["rational", "gelu", "relu", "identity"])
@pytest.mark.parametrize("pooler", ["attention", "last", "mean", "max"])
def test_router_logits_match_hand_computation(pooler, act, position):
    router = make_router(pooler=pooler, activation=act, activation_position=position)
    hidden = torch.tensor(HIDDEN, dtype=torch.float32)
    mask = torch.tensor(MASK)
    with torch.no_grad():
        gates, probs, logits = router(hidden, mask)
    assert torch.isfinite(logits).all(), "a masked inf/nan leaked into the logits: mask by selection"
    for row in range(2):
        expected = hand_logits(row, pooler, act, position)
        assert logits[row].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5), (pooler, act, position, row)
        assert probs[row].tolist() == pytest.approx(hand_softmax(expected), rel=1e-5, abs=1e-6)
        assert gates[row].tolist() == pytest.approx(hand_gates(expected, 1, "paper"), rel=1e-5, abs=1e-6)


def test_pre_pool_and_post_pool_differ():
    # With a non-linear activation the two positions are different functions; if the option
    # were ignored, the parametrised test above could still pass for one of them only.
    a = hand_logits(0, "mean", "relu", "pre_pool")
    b = hand_logits(0, "mean", "relu", "post_pool")
    assert a != pytest.approx(b)
    for position, expected in (("pre_pool", a), ("post_pool", b)):
        router = make_router(pooler="mean", activation="relu", activation_position=position)
        with torch.no_grad():
            _, _, logits = router(torch.tensor(HIDDEN), torch.tensor(MASK))
        assert logits[0].tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("mode", ["paper", "renormalized"])
@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_gate_modes_match_hand_computation(mode, k):
    z = [0.3, -1.2, 2.0, 0.7, 1.1, -0.4, 0.0]
    gates, probs = top_k_gates(torch.tensor([z], dtype=torch.float64), k, mode)
    expected = hand_gates(z, k, mode)
    assert gates[0].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert probs[0].tolist() == pytest.approx(hand_softmax(z), rel=1e-12)
    assert int((gates[0] != 0).sum()) == k
    if mode == "renormalized" or k == 7:
        # k = 7 is not plain LoRA: gates still sum to 1 (docs/method.md).
        assert float(gates.sum()) == pytest.approx(1.0, abs=1e-12)


def test_renormalized_k1_gate_is_exactly_one():
    router = make_router(pooler="mean", activation="identity", gate_mode="renormalized", top_k=1)
    with torch.no_grad():
        gates, _, logits = router(torch.tensor(HIDDEN), torch.tensor(MASK))
    for row in range(2):
        winner = hand_top_k(logits[row].tolist(), 1)[0]
        assert gates[row, winner].item() == 1.0  # exactly, not approximately
        assert int((gates[row] != 0).sum()) == 1


def test_ties_lower_expert_index_wins():
    z = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0, 2.0],
                      [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    for mode in ("paper", "renormalized"):
        for k, want0, want1 in ((1, [1], [0]), (2, [1, 2], [0, 1]), (3, [1, 2, 3], [0, 1, 2])):
            gates, _ = top_k_gates(z, k, mode)
            assert (gates[0] != 0).nonzero().flatten().tolist() == want0, (mode, k)
            assert (gates[1] != 0).nonzero().flatten().tolist() == want1, (mode, k)


def test_ties_through_the_router():
    # Experts 2, 4 and 6 have the same weight row, hence equal logits: the lowest index wins.
    router = make_router(pooler="last", activation="identity", top_k=2)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[[2, 4, 6]] = torch.tensor([1.0, 1.0, 1.0])
        gates, _, logits = router(torch.tensor([[[1.0, 1.0, 1.0]]]), torch.tensor([[True]]))
    assert logits[0, 2] == logits[0, 4] == logits[0, 6]
    assert (gates[0] != 0).nonzero().flatten().tolist() == [2, 4]


def test_masked_positions_do_not_change_routing():
    # Same real tokens, different garbage in the masked slots: identical logits, bitwise.
    for pooler in ("attention", "last", "mean", "max"):
        router = make_router(pooler=pooler, activation="rational", activation_position="pre_pool")
        h1 = torch.tensor(HIDDEN)
        h2 = h1.clone()
        m = torch.tensor(MASK)
        h2[~m] = torch.tensor([-5.0, 3.0, 1e4])
        with torch.no_grad():
            assert torch.equal(router(h1, m)[2], router(h2, m)[2]), pooler


# ---- load-balancing losses ----

PROBS = [
    [0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05],
    [0.2, 0.4, 0.1, 0.1, 0.1, 0.05, 0.05],
    [0.6, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05],
]


def hand_switch(probs: list[list[float]]) -> float:
    b, e = len(probs), len(probs[0])
    argmax = [max(range(e), key=lambda i: (row[i], -i)) for row in probs]
    f = [sum(1 for a in argmax if a == i) / b for i in range(e)]
    p = [sum(row[i] for row in probs) / b for i in range(e)]
    return e * sum(fi * pi for fi, pi in zip(f, p))


def hand_cv2(probs: list[list[float]]) -> float:
    e = len(probs[0])
    imp = [sum(row[i] for row in probs) for i in range(e)]
    mean = sum(imp) / e
    var = sum((x - mean) ** 2 for x in imp) / (e - 1)  # Bessel, as Shazeer's cv_squared (docstring)
    return var / mean**2


def test_switch_loss_hand_value():
    # f = (2/3, 1/3, 0, ...), P_0 = 1.3/3, P_1 = 0.6/3 -> 7 * (2/3 * 1.3/3 + 1/3 * 0.6/3)
    expected = 7 * (2 / 3 * 1.3 / 3 + 1 / 3 * 0.6 / 3)
    assert hand_switch(PROBS) == pytest.approx(expected)
    got = switch_loss(torch.tensor(PROBS, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Uniform routing gives exactly 1, the loss's minimum (a uniform prompt's argmax is expert 0).
    assert switch_loss(torch.full((7, 7), 1 / 7)).item() == pytest.approx(1.0, rel=1e-6)


def test_cv2_loss_hand_value():
    expected = hand_cv2(PROBS)
    assert cv2_loss(torch.tensor(PROBS, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-6)
    # Balanced importance gives 0; a single prompt is NOT a no-op (the reference code's bug).
    assert cv2_loss(torch.full((3, 7), 1 / 7)).item() == pytest.approx(0.0, abs=1e-9)
    assert cv2_loss(torch.tensor(PROBS[:1])).item() == pytest.approx(hand_cv2(PROBS[:1]), rel=1e-5)
    assert hand_cv2(PROBS[:1]) > 0.1


def test_load_balancing_averages_over_layers():
    other = [[1 / 7] * 7, [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.4], [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2]]
    layers = [torch.tensor(PROBS), torch.tensor(other)]
    assert load_balancing_loss(layers, "switch").item() == pytest.approx(
        (hand_switch(PROBS) + hand_switch(other)) / 2, rel=1e-5)
    assert load_balancing_loss(layers, "cv2").item() == pytest.approx((hand_cv2(PROBS) + hand_cv2(other)) / 2, rel=1e-5)
    assert load_balancing_loss(layers, "none") is None


# ---- float32 routers ----

def test_router_runs_in_fp32_on_fp16_input_that_would_overflow_fp16():
    # x = 12: x^5 = 248832 > 65504, the fp16 maximum; an fp16 router returns inf/nan here.
    router = make_router(pooler="mean", activation="rational")
    h16 = torch.full((1, 2, D), 12.0, dtype=torch.float16)
    with torch.no_grad():
        gates, probs, logits = router(h16, torch.ones(1, 2, dtype=torch.bool))
    assert logits.dtype == gates.dtype == probs.dtype == torch.float32
    r = hand_rational(12.0)
    assert logits[0].tolist() == pytest.approx([r * sum(w) for w in W_R], rel=1e-5)


@pytest.mark.parametrize("position", ["post_pool", "pre_pool"])
@pytest.mark.parametrize("pooler", ["attention", "last", "mean", "max"])
def test_masked_garbage_does_not_poison_gradients(pooler, position):
    # Training backpropagates through the router: inf/nan in masked slots must not turn the
    # pooler's or the rational coefficients' gradients into nan (0 * inf = nan in a backward).
    router = make_router(pooler=pooler, activation="rational", activation_position=position, top_k=2).train()
    hidden = torch.tensor(HIDDEN, requires_grad=True)
    gates, probs, logits = router(hidden, torch.tensor(MASK))
    (gates.sum() + probs[:, 0].sum() + logits.pow(2).sum()).backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(hidden.grad[torch.tensor(MASK)]).all()
