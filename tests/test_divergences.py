"""Tests of :mod:`todi.divergences` against references written here from the specification.

Every reference below is written out plainly in float64 numpy / torch from the formula in the
spec; none of them calls the code under test. With p = softmax(teacher / T), q = softmax(student / T):

    fkl  sum p (log p - log q)              rkl   sum q (log q - log p)
    js   1/2 KL(p||m) + 1/2 KL(q||m), m = (p + q) / 2
    tvd  1/2 sum |p - q|
    skl  KL(p || lam p + (1 - lam) q)      srkl  KL(q || (1 - lam) p + lam q)     (lam = skew)
    akl  (g_head fkl + g_tail rkl) / (g_head + g_tail), g = sum |p - q| over head / tail; as in the
         ToDi authors' baseline code: sort p ascending, tail = items whose cumulative p is <= mu
    todi sum a p (log p - log q) + (1 - a) q (log q - log p), a = sg(sigmoid(beta (log p - log q)))
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import ref_log_softmax, ref_todi_share, sigmoid
from todi.divergences import DIVERGENCES, divergence, todi_weight

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ALL = ("fkl", "rkl", "js", "tvd", "skl", "srkl", "akl", "todi")
# Divergences whose value is a plain differentiable function of both logit sets (no stop-gradient).
PLAIN = ("fkl", "rkl", "js", "tvd", "skl", "srkl")
# Divergences compared value-for-value with the reference in the generic tests. akl is compared by its
# own sweep below (ties at the head/tail boundary have to be skipped); generic tests check akl through
# rule-agnostic properties (it is a convex combination of fkl and rkl).
EXACT = tuple(n for n in ALL if n != "akl")

EPS32 = float(np.finfo(np.float32).eps)
RTOL = 1e-5
# Absolute slack for values near 0. float32 log_softmax rounds every log-probability to ~1 ulp of its own
# magnitude, and the divergences subtract two mass-weighted averages of log-probabilities (e.g. fkl =
# sum p log p - sum p log q). For a flat row of V = 5000 items |log p| ~ log V ~ 8.5, whose float32 ulp is
# 9.5e-7, so the float32 result can be off by about 2 ulp ~ 2e-6 however small the divergence itself is
# (observed worst case ~1.1e-6 above the relative term). Larger divergences are held to RTOL.
ATOL = 2e-6


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ----------------------------------------------------------------------------------------------------------
# float64 numpy references, written from the spec
# ----------------------------------------------------------------------------------------------------------
# (ref_log_softmax, sigmoid and ref_todi_share are in helpers.py)


def xlogy_ratio(x: np.ndarray, log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """Elementwise x (log x - log y) with the convention 0 log 0 = 0."""
    return np.where(x > 0, x * (log_x - log_y), 0.0)


def akl_head(p: np.ndarray, mu: float) -> np.ndarray:
    """Head mask of one row: sort p ascending, tail = items whose (inclusive) cumulative p is <= mu."""
    order = np.argsort(p, kind="stable")
    tail_sorted = np.cumsum(p[order]) <= mu
    head = np.ones(p.shape[0], dtype=bool)
    head[order[tail_sorted]] = False
    return head


def ref_akl_row(p: np.ndarray, q: np.ndarray, lp: np.ndarray, lq: np.ndarray, mu: float) -> float:
    """Adaptive KL for one position with the head/tail split of :func:`akl_head`."""
    head = akl_head(p, mu)
    g_head = float(np.abs(p - q)[head].sum())
    g_tail = float(np.abs(p - q)[~head].sum())
    if g_head + g_tail == 0.0:
        return 0.0
    fkl = float(xlogy_ratio(p, lp, lq).sum())
    rkl = float(xlogy_ratio(q, lq, lp).sum())
    return (g_head * fkl + g_tail * rkl) / (g_head + g_tail)


def akl_boundary_margin(p: np.ndarray, mu: float) -> float:
    """Distance of the ascending cumulative teacher mass from mu (small = head/tail split is ambiguous)."""
    cumulative = np.cumsum(np.sort(p))
    return float(np.abs(cumulative - mu).min())


def ref_from_logp(name: str, lq: np.ndarray, lp: np.ndarray, **params: float) -> np.ndarray:
    """Divergence per position from float64 log-probabilities lq (student) and lp (teacher)."""
    p, q = np.exp(lp), np.exp(lq)
    if name == "fkl":
        return xlogy_ratio(p, lp, lq).sum(-1)
    if name == "rkl":
        return xlogy_ratio(q, lq, lp).sum(-1)
    if name == "js":
        with np.errstate(divide="ignore"):
            log_m = np.log((p + q) / 2.0)
        return 0.5 * xlogy_ratio(p, lp, log_m).sum(-1) + 0.5 * xlogy_ratio(q, lq, log_m).sum(-1)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "skl":
        lam = params.get("skew", 0.1)
        with np.errstate(divide="ignore"):
            log_mix = np.log(lam * p + (1.0 - lam) * q)
        return xlogy_ratio(p, lp, log_mix).sum(-1)
    if name == "srkl":
        lam = params.get("skew", 0.1)
        with np.errstate(divide="ignore"):
            log_mix = np.log((1.0 - lam) * p + lam * q)
        return xlogy_ratio(q, lq, log_mix).sum(-1)
    if name == "akl":
        mu = params.get("mu", 0.5)
        rows_p, rows_q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
        rows_lp, rows_lq = lp.reshape(rows_p.shape), lq.reshape(rows_q.shape)
        out = [ref_akl_row(a, b, c, d, mu) for a, b, c, d in zip(rows_p, rows_q, rows_lp, rows_lq)]
        return np.asarray(out, dtype=np.float64).reshape(p.shape[:-1])
    if name == "todi":
        beta = params.get("beta", 1.0)
        a = sigmoid(beta * (lp - lq))
        return (a * p * (lp - lq) + (1.0 - a) * q * (lq - lp)).sum(-1)
    raise AssertionError(name)


def ref_divergence(name: str, student: np.ndarray, teacher: np.ndarray, T: float = 1.0, **params: float):
    """Reference from logits, with masking: entries where either logit is non-finite are dropped from both
    distributions; a position with nothing left has divergence 0."""
    student = np.asarray(student, dtype=np.float64)
    teacher = np.asarray(teacher, dtype=np.float64)
    out = np.zeros(student.shape[:-1], dtype=np.float64)
    for index in np.ndindex(*student.shape[:-1]):
        s, t = student[index], teacher[index]
        keep = np.isfinite(s) & np.isfinite(t)
        if not keep.any():
            continue
        lq, lp = ref_log_softmax(s[keep] / T), ref_log_softmax(t[keep] / T)
        out[index] = ref_from_logp(name, lq, lp, **params)
    return out


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    excess = np.abs(actual - expected) - (rtol * np.abs(expected) + atol)
    worst = int(np.argmax(excess))
    assert excess.max() <= 0, (
        f"actual {actual.flat[worst]!r} vs reference {expected.flat[worst]!r} "
        f"(|diff| = {abs(actual.flat[worst] - expected.flat[worst]):.3e})"
    )


def check_value(name, actual, student, teacher, T=1.0, rtol=RTOL, atol=ATOL, **params) -> None:
    """assert_close against the reference; for akl, that the value lies between fkl and rkl (both from the
    reference), which holds whatever the head/tail split is, since its weights are >= 0 and sum to 1 (or
    both are 0 when p == q, where fkl = rkl = 0)."""
    if name != "akl":
        assert_close(actual, ref_divergence(name, student, teacher, T, **params), rtol=rtol, atol=atol)
        return
    fkl = ref_divergence("fkl", student, teacher, T)
    rkl = ref_divergence("rkl", student, teacher, T)
    low, high = np.minimum(fkl, rkl), np.maximum(fkl, rkl)
    actual = np.asarray(actual, dtype=np.float64)
    assert np.isfinite(actual).all()
    assert (actual >= low - (rtol * low + atol)).all() and (actual <= high + (rtol * high + atol)).all()


def _t(x: np.ndarray, dtype=torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype, requires_grad=grad)


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------


def test_registry_lists_every_specified_divergence():
    assert set(DIVERGENCES) == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_unknown_parameter_raises(name):
    s, t = torch.zeros(2, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError):
        divergence(name, s, t, not_a_parameter=1.0)


@pytest.mark.parametrize("name", ["fkl", "rkl", "js", "tvd"])
def test_parameter_of_another_divergence_raises(name):
    s, t = torch.zeros(2, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError):
        divergence(name, s, t, beta=1.0)


# ----------------------------------------------------------------------------------------------------------
# values against the float64 reference
# ----------------------------------------------------------------------------------------------------------

SHAPES = [(2,), (3, 37), (4, 1000), (2, 3, 5000)]
SCALES = [0.1, 1.0, 10.0, 30.0]


def _random_pair(shape, scale, pairing, seed):
    rng = np.random.default_rng(seed)
    teacher = (rng.standard_normal(shape) * scale).astype(np.float32)
    if pairing == "independent":
        student = (rng.standard_normal(shape) * scale).astype(np.float32)
    else:  # a student near the teacher: small divergences, where the absolute error matters most
        student = (teacher + 0.3 * scale * rng.standard_normal(shape)).astype(np.float32)
    return student, teacher


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("pairing", ["independent", "close"])
def test_float32_matches_float64_reference(name, shape, scale, temperature, pairing):
    # The same data for every divergence (the seed does not depend on the name).
    seed = [len(shape), shape[-1], int(scale * 10), int(temperature), pairing == "close"]
    student, teacher = _random_pair(shape, scale, pairing, seed=seed)
    out = divergence(name, _t(student), _t(teacher), temperature=temperature)
    assert out.dtype == torch.float32
    assert out.shape == shape[:-1]
    expected = ref_divergence(name, student, teacher, temperature)
    assert_close(out.numpy(), expected)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("skl", {"skew": 0.3}),
        ("srkl", {"skew": 0.7}),
        ("todi", {"beta": 0.3}),
        ("todi", {"beta": 4.0}),
        ("skl", {"skew": 0.0}),
        ("srkl", {"skew": 1.0}),
    ],
)
def test_non_default_parameters_match_reference(name, params):
    student, teacher = _random_pair((5, 64), 2.0, "independent", seed=7)
    out = divergence(name, _t(student), _t(teacher), temperature=1.5, **params)
    assert_close(out.numpy(), ref_divergence(name, student, teacher, 1.5, **params))


def test_skew_zero_and_one_reduce_to_kl():
    # skl with lam = 0 is KL(p || q) = fkl; srkl with lam = 0 is KL(q || p) = rkl; lam = 1 gives 0.
    student, teacher = _random_pair((3, 50), 1.0, "independent", seed=3)
    s, t = _t(student, torch.float64), _t(teacher, torch.float64)
    fkl = ref_divergence("fkl", student, teacher)
    rkl = ref_divergence("rkl", student, teacher)
    np.testing.assert_allclose(divergence("skl", s, t, skew=0.0).numpy(), fkl, rtol=1e-12)
    np.testing.assert_allclose(divergence("srkl", s, t, skew=0.0).numpy(), rkl, rtol=1e-12)
    np.testing.assert_allclose(divergence("skl", s, t, skew=1.0).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(divergence("srkl", s, t, skew=1.0).numpy(), 0.0, atol=1e-12)


def test_akl_peaked_teacher_has_top1_head():
    # p = (0.7, 0.2, 0.1): ascending cumulative (0.1, 0.3, 1.0) -> tail = {0.1, 0.2}, head = {0.7}:
    # g_head = |0.7 - q0|, g_tail = |0.2 - q1| + |0.1 - q2|.
    p = np.array([0.7, 0.2, 0.1])
    q = np.array([0.3, 0.3, 0.4])
    lp, lq = np.log(p), np.log(q)
    g_head, g_tail = 0.4, 0.1 + 0.3
    fkl = float((p * (lp - lq)).sum())
    rkl = float((q * (lq - lp)).sum())
    expected = (g_head * fkl + g_tail * rkl) / (g_head + g_tail)
    out = divergence("akl", torch.tensor(lq), torch.tensor(lp))
    np.testing.assert_allclose(out.item(), expected, rtol=1e-12)
    assert ref_akl_row(p, q, lp, lq, 0.5) == pytest.approx(expected, rel=1e-12)


def test_akl_straddling_item_is_head():
    # p = (0.4, 0.3, 0.2, 0.1), mu = 0.5: ascending cumulative (0.1, 0.3, 0.6, 1.0) -> tail = {0.1, 0.2};
    # the item straddling mu (0.3) is head, as in the ToDi authors' code. (Wu et al.'s get_ratio, which
    # cuts the head from the top with an inclusive cumsum, would put it in the tail: value 0.329618.)
    p = np.array([0.4, 0.3, 0.2, 0.1])
    q = np.array([0.1, 0.6, 0.25, 0.05])
    lp, lq = np.log(p), np.log(q)
    fkl = float((p * (lp - lq)).sum())
    rkl = float((q * (lq - lp)).sum())
    g_head, g_tail = 0.3 + 0.3, 0.05 + 0.05
    expected = (g_head * fkl + g_tail * rkl) / (g_head + g_tail)  # 0.360849...
    assert expected == pytest.approx(0.360849, abs=1e-6)
    assert ref_akl_row(p, q, lp, lq, 0.5) == pytest.approx(expected, rel=1e-12)
    out = divergence("akl", torch.tensor(lq), torch.tensor(lp))
    np.testing.assert_allclose(out.item(), expected, rtol=1e-12)


@pytest.mark.parametrize("mu", [0.5, 0.8, 0.0])
def test_akl_float32_matches_float64_reference(mu):
    failures = []
    for shape in SHAPES:
        for scale in SCALES:
            for temperature in (1.0, 2.0):
                for pairing in ("independent", "close"):
                    seed = [len(shape), shape[-1], int(scale * 10), int(temperature), pairing == "close"]
                    student, teacher = _random_pair(shape, scale, pairing, seed=seed)
                    # Avoid head/tail ties: float32 and float64 cumulative sums must agree on the side of mu.
                    p = np.exp(ref_log_softmax(teacher.astype(np.float64) / temperature))
                    if min(akl_boundary_margin(row, mu) for row in p.reshape(-1, shape[-1])) < 1e-5:
                        continue
                    out = divergence("akl", _t(student), _t(teacher), temperature=temperature, mu=mu)
                    assert out.dtype == torch.float32 and out.shape == shape[:-1]
                    try:
                        assert_close(out.numpy(), ref_divergence("akl", student, teacher, temperature, mu=mu))
                    except AssertionError as error:
                        failures.append(f"{shape} scale={scale} T={temperature} {pairing}: {error}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("mu", [0.5, 0.8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_akl_matches_reference_when_head_is_top1(mu, temperature):
    # Rows whose top teacher item has p > mu: the head is {top-1} under the spec, so this pins the gap
    # weighting, the detach-free value and the normalisation independently of the straddling-item rule.
    rng = np.random.default_rng(29)
    teacher = rng.standard_normal((4, 3, 700)) * 1.5
    teacher[..., 5] += 30.0 * temperature  # p(top-1) ~ 1 - 1e-6
    student = teacher + rng.standard_normal(teacher.shape) * 3.0
    student, teacher = student.astype(np.float32), teacher.astype(np.float32)
    p = np.exp(ref_log_softmax(teacher.astype(np.float64) / temperature))
    assert (p.max(-1) > mu + 0.05).all()
    out = divergence("akl", _t(student), _t(teacher), temperature=temperature, mu=mu)
    assert_close(out.numpy(), ref_divergence("akl", student, teacher, temperature, mu=mu))


def test_akl_identical_distributions_give_zero_not_nan():
    x = torch.randn(3, 10, requires_grad=True)
    out = divergence("akl", x, x.detach())
    assert torch.equal(out, torch.zeros(3))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all()


def test_todi_weight_matches_reference_share():
    student, teacher = _random_pair((6, 300), 2.0, "independent", seed=11)
    ls = torch.log_softmax(_t(student, torch.float64), -1)
    lt = torch.log_softmax(_t(teacher, torch.float64), -1)
    for beta in (1.0, 0.5, 3.0):
        out = todi_weight(ls, lt, beta)
        np.testing.assert_allclose(out.numpy(), ref_todi_share(student, teacher, beta=beta), rtol=1e-10)
        assert ((out >= 0) & (out <= 1)).all()
    # p == q: no contribution anywhere, the share is defined as 1/2.
    np.testing.assert_array_equal(todi_weight(lt, lt, 1.0).numpy(), np.full(6, 0.5))


# ----------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------


def _gradcheck_pair(seed: int, shape=(3, 7), scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    return s, t


@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradcheck_plain_divergences(name, temperature):
    s, t = _gradcheck_pair(seed=ALL.index(name))
    # w.r.t. both the student and the teacher logits: no stop-gradient in these divergences.
    assert torch.autograd.gradcheck(
        lambda a, b: divergence(name, a, b, temperature=temperature), (s, t), eps=1e-6, atol=1e-7
    )


def _torch_logp(z: torch.Tensor, T: float) -> torch.Tensor:
    z = z / T
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def _frozen_todi_reference(s0: torch.Tensor, t0: torch.Tensor, T: float, beta: float):
    """ToDi as a function of both logit sets with a computed once at (s0, t0) and then held constant."""
    with torch.no_grad():
        a = torch.sigmoid(beta * (_torch_logp(t0, T) - _torch_logp(s0, T)))

    def f(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lq, lp = _torch_logp(s, T), _torch_logp(t, T)
        p, q = lp.exp(), lq.exp()
        return (a * p * (lp - lq) + (1 - a) * q * (lq - lp)).sum(-1)

    return f


def _frozen_akl_reference(s0: torch.Tensor, t0: torch.Tensor, T: float, mu: float):
    """AKL with the head set and the gaps g_head, g_tail computed once at (s0, t0) (numpy sort) and then
    held constant; the remaining function is w_head fkl + w_tail rkl."""
    lq0 = _torch_logp(s0, T).detach().numpy()
    lp0 = _torch_logp(t0, T).detach().numpy()
    w_head = np.zeros(lq0.shape[:-1])
    for row in np.ndindex(*lq0.shape[:-1]):
        p, q = np.exp(lp0[row]), np.exp(lq0[row])
        assert akl_boundary_margin(p, mu) > 1e-2, "gradcheck data must avoid akl head/tail ties"
        head = akl_head(p, mu)
        g_head, g_tail = np.abs(p - q)[head].sum(), np.abs(p - q)[~head].sum()
        w_head[row] = g_head / (g_head + g_tail)
    w_head = torch.tensor(w_head, dtype=torch.float64)

    def f(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        lq, lp = _torch_logp(s, T), _torch_logp(t, T)
        fkl = (lp.exp() * (lp - lq)).sum(-1)
        rkl = (lq.exp() * (lq - lp)).sum(-1)
        return w_head * fkl + (1 - w_head) * rkl

    return f


def _central_difference_vjp(f, s0, t0, weights, eps=1e-6):
    """d/dx of sum(weights * f(s, t)) by central differences, for x = s and x = t."""
    grads = []
    for which in range(2):
        base = [s0.detach().clone(), t0.detach().clone()]
        grad = torch.zeros_like(base[which])
        flat = base[which].view(-1)
        for i in range(flat.numel()):
            keep = flat[i].item()
            flat[i] = keep + eps
            up = (weights * f(*base)).sum().item()
            flat[i] = keep - eps
            down = (weights * f(*base)).sum().item()
            flat[i] = keep
            grad.view(-1)[i] = (up - down) / (2 * eps)
        grads.append(grad)
    return grads


@pytest.mark.parametrize(
    ("name", "params", "make_reference"),
    [
        ("todi", {"beta": 1.0}, lambda s, t, T, p: _frozen_todi_reference(s, t, T, p["beta"])),
        ("todi", {"beta": 2.5}, lambda s, t, T, p: _frozen_todi_reference(s, t, T, p["beta"])),
        ("akl", {"mu": 0.5}, lambda s, t, T, p: _frozen_akl_reference(s, t, T, p["mu"])),
        ("akl", {"mu": 0.8}, lambda s, t, T, p: _frozen_akl_reference(s, t, T, p["mu"])),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_detached_weights_are_constants_in_the_gradient(name, params, make_reference, temperature):
    # todi's a and akl's head/tail gaps are stop-gradient: the code's gradient must equal the gradient of
    # the same formula in which those weights are computed once at the base point and frozen. The frozen
    # reference is checked by gradcheck (its autograd == its finite differences), and the code's autograd
    # gradient at the base point is compared with central differences of the frozen reference.
    s0, t0 = _gradcheck_pair(seed=100 + len(name) + int(temperature), shape=(3, 6), scale=1.2)
    if name == "akl":
        # a dominant teacher item (p > 0.9 > mu) so that the head is {top-1} far from any tie; the head/tail
        # rule itself is pinned by the akl value tests above.
        with torch.no_grad():
            t0[:, 2] += 6.0 * temperature
        assert (torch.softmax(t0 / temperature, -1).max(-1).values > params["mu"] + 0.05).all()
    f_ref = make_reference(s0, t0, temperature, params)
    assert torch.autograd.gradcheck(f_ref, (s0, t0), eps=1e-6, atol=1e-7)

    weights = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
    out = divergence(name, s0, t0, temperature=temperature, **params)
    np.testing.assert_allclose(out.detach().numpy(), f_ref(s0, t0).detach().numpy(), rtol=1e-12)
    grad_s, grad_t = torch.autograd.grad((weights * out).sum(), (s0, t0))
    fd_s, fd_t = _central_difference_vjp(f_ref, s0, t0, weights)
    np.testing.assert_allclose(grad_s.numpy(), fd_s.numpy(), atol=1e-7, rtol=1e-6)
    np.testing.assert_allclose(grad_t.numpy(), fd_t.numpy(), atol=1e-7, rtol=1e-6)

    # ... and differs from the gradient in which the weights are differentiated (the detach is real).
    if name == "todi":
        beta = params["beta"]

        def undetached(s, t):
            lq, lp = _torch_logp(s, temperature), _torch_logp(t, temperature)
            a = torch.sigmoid(beta * (lp - lq))
            return (a * lp.exp() * (lp - lq) + (1 - a) * lq.exp() * (lq - lp)).sum(-1)

        full_s = torch.autograd.grad((weights * undetached(s0, t0)).sum(), s0)[0]
        assert (full_s - grad_s).abs().max() > 1e-3


def test_todi_beta1_value_is_fkl_plus_rkl_but_gradient_is_not():
    T = 2.0
    s, t = _gradcheck_pair(seed=5, shape=(4, 9), scale=2.0)
    todi = divergence("todi", s, t, temperature=T, beta=1.0)
    sym = divergence("fkl", s, t, temperature=T) + divergence("rkl", s, t, temperature=T)
    # value: a = p / (p + q) at beta = 1, so a p log(p/q) - (1 - a) q log(p/q) = (p - q) log(p/q).
    np.testing.assert_allclose(todi.detach().numpy(), sym.detach().numpy(), rtol=1e-12, atol=1e-14)
    ref = ref_divergence("fkl", s.detach().numpy(), t.detach().numpy(), T) + ref_divergence(
        "rkl", s.detach().numpy(), t.detach().numpy(), T
    )
    np.testing.assert_allclose(todi.detach().numpy(), ref, rtol=1e-12)

    g_todi = torch.autograd.grad(todi.sum(), s)[0]
    g_sym = torch.autograd.grad(sym.sum(), s)[0]
    assert (g_todi - g_sym).abs().max() > 1e-2, "ToDi gradient must differ from the gradient of FKL + RKL"

    # analytic gradient with a held constant: s' = z / T, q = softmax(s'), d = log q - log p,
    # dD/ds'_j = -a_j p_j + q_j sum(a p) + (1 - a_j) q_j (d_j + 1) - q_j sum((1 - a) q (d + 1)); then / T.
    lq = ref_log_softmax(s.detach().numpy() / T)
    lp = ref_log_softmax(t.detach().numpy() / T)
    p, q = np.exp(lp), np.exp(lq)
    a = sigmoid(lp - lq)
    d = lq - lp
    analytic = (
        -a * p
        + q * (a * p).sum(-1, keepdims=True)
        + (1 - a) * q * (d + 1)
        - q * ((1 - a) * q * (d + 1)).sum(-1, keepdims=True)
    ) / T
    np.testing.assert_allclose(g_todi.numpy(), analytic, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# agreement with peer libraries
# ----------------------------------------------------------------------------------------------------------


def _generalized_jsd_loss():
    pytest.importorskip("trl")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:  # older layout
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def _mean_over_supervised(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = labels != -100
    return values[keep].sum() / keep.sum()


# TRL's generalized JSD with coefficient beta uses the mixture m = beta p + (1 - beta) q and returns
# beta KL(p||m) + (1 - beta) KL(q||m), special-casing beta = 0 as KL(p||q) (= fkl) and beta = 1 as
# KL(q||p) (= rkl); beta = 0.5 is the plain JS. It divides both logit sets by the temperature (no T^2)
# and, with reduction "batchmean" and labels, returns the sum over supervised tokens / their count.
TRL_BETA = {"fkl": 0.0, "rkl": 1.0, "js": 0.5}


@pytest.mark.parametrize("name", list(TRL_BETA))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_agrees_with_trl_generalized_jsd(name, temperature):
    gjsd = _generalized_jsd_loss()
    student, teacher = _random_pair((2, 5, 257), 3.0, "independent", seed=21)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, 7]])
    s, t = _t(student), _t(teacher)
    theirs = gjsd(s, t, labels=labels, beta=TRL_BETA[name], temperature=temperature, reduction="batchmean")
    ours = _mean_over_supervised(divergence(name, s, t, temperature=temperature), labels)
    assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item()) + ATOL


# Liger's chunked LigerFusedLinearJSDLoss (liger_kernel/chunked_loss/jsd_loss.py) uses the same convention
# as TRL: for 0 < beta < 1, log m = logsumexp(log q + log(1 - beta), log p + log beta) and the loss is
# beta KL(p||m) + (1 - beta) KL(q||m); beta = 0 is KL(p||q) (= fkl) and beta = 1 is KL(q||p) (= rkl).
# Temperature: fused_linear_distillation._compute_loss divides both logit chunks by T (no T^2 factor);
# the soft loss is summed over non-ignored tokens and divided by their count in the whole batch.
# compiled=False keeps torch.compile out of the CPU test.
@pytest.mark.parametrize("name", list(TRL_BETA))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_agrees_with_liger_fused_linear_jsd(name, temperature):
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    g = torch.Generator().manual_seed(31)
    n, hidden, vocab = 12, 16, 301
    h_s = torch.randn(n, hidden, generator=g).requires_grad_(True)
    w_s = (torch.randn(vocab, hidden, generator=g) * 0.5).requires_grad_(True)
    h_t = torch.randn(n, hidden, generator=g)
    w_t = torch.randn(vocab, hidden, generator=g) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[[0, 3, 4, 9]] = -100

    liger = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=TRL_BETA[name],
        temperature=temperature,
        compiled=False,
        chunk_size=4,
        return_soft_hard_loss=True,
    )
    loss, soft, _hard = liger(h_s, w_s, h_t, w_t, labels)
    assert soft.item() == pytest.approx(loss.item(), rel=1e-6)
    liger_grads = torch.autograd.grad(loss, (h_s, w_s))

    ours = _mean_over_supervised(divergence(name, h_s @ w_s.T, h_t @ w_t.T, temperature=temperature), labels)
    assert abs(ours.item() - soft.item()) <= 1e-5 * abs(soft.item()) + ATOL
    our_grads = torch.autograd.grad(ours, (h_s, w_s))
    for mine, theirs in zip(our_grads, liger_grads):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# numerical safety: -inf logits, dtypes, identical inputs, shapes
# ----------------------------------------------------------------------------------------------------------

NEG_INF = -math.inf


def _masked_case(kind: str):
    rng = np.random.default_rng(3)
    student = rng.standard_normal((4, 9)) * 2
    teacher = rng.standard_normal((4, 9)) * 2
    if kind == "teacher":
        teacher[:, [1, 5]] = NEG_INF
        teacher[2, 7] = NEG_INF
    elif kind == "student":
        student[:, [0, 8]] = NEG_INF
    elif kind == "both":
        student[:, 3] = NEG_INF
        teacher[:, 3] = NEG_INF
        student[1, 4] = NEG_INF
        teacher[1, 6] = NEG_INF
    elif kind == "row":
        student[2, :] = NEG_INF
        teacher[2, :] = NEG_INF
        teacher[0, :8] = NEG_INF  # one item left: p = q = 1 -> 0
        student[3, :] = NEG_INF  # student row fully masked, teacher finite -> whole row masked
    elif kind == "plus-inf":  # +inf is masked like -inf (a NaN teacher logit is an error: test_faults)
        teacher[0, 2] = math.inf
        student[1, 2] = math.inf
    return student, teacher


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", ["teacher", "student", "both", "row", "plus-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_vocabulary_entries(name, kind, dtype):
    student, teacher = _masked_case(kind)
    s, t = _t(student, dtype, grad=True), _t(teacher, dtype, grad=True)
    out = divergence(name, s, t, temperature=2.0)
    assert torch.isfinite(out).all()
    check_value(name, out.detach().numpy(), student, teacher, 2.0, rtol=1e-5, atol=1e-6)
    if kind == "row":
        assert out[2].item() == 0.0 and out[3].item() == 0.0  # fully masked rows: exactly 0
        assert abs(out[0].item()) <= 1e-6  # one item left: p = q = 1 (float32 log of the skew mix ~ 1 ulp)
    weights = torch.linspace(0.5, 2.0, out.numel(), dtype=dtype).view(out.shape)
    gs, gt = torch.autograd.grad((weights * out).sum(), (s, t))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    masked = torch.from_numpy(~(np.isfinite(student) & np.isfinite(teacher)))
    assert (gs[masked] == 0).all() and (gt[masked] == 0).all()
    # the gradient on the kept entries equals that of the divergence on the kept entries alone
    if kind in ("teacher", "both") and name in PLAIN:
        row = 0
        keep = torch.from_numpy(np.isfinite(student[row]) & np.isfinite(teacher[row]))
        s_kept = _t(student[row][keep.numpy()], dtype, grad=True)
        t_kept = _t(teacher[row][keep.numpy()], dtype)
        sub = divergence(name, s_kept, t_kept, temperature=2.0)
        g_sub = torch.autograd.grad(weights[row] * sub, s_kept)[0]
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(gs[row][keep].numpy(), g_sub.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ALL)
def test_zero_probabilities_without_masking_are_safe(name):
    # finite but extreme logits: probabilities underflow to exactly 0 in float32 (exp(-200) == 0).
    s = torch.tensor([[0.0, -200.0, 3.0, -1000.0], [50.0, -50.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-300.0, 0.0, 1.0, 2.0], [-50.0, 50.0, 0.0, -900.0]], requires_grad=True)
    out = divergence(name, s, t)
    assert torch.isfinite(out).all()
    gs, gt = torch.autograd.grad(out.sum(), (s, t))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    check_value(name, out.detach().numpy(), s.detach().numpy(), t.detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_bf16_inputs_give_float32_close_to_float32_of_same_values(name):
    student, teacher = _random_pair((3, 4, 200), 2.0, "independent", seed=17)
    s16, t16 = _t(student).bfloat16(), _t(teacher).bfloat16()
    out = divergence(name, s16, t16, temperature=2.0)
    assert out.dtype == torch.float32
    same_values = divergence(name, s16.float(), t16.float(), temperature=2.0)
    np.testing.assert_allclose(out.numpy(), same_values.numpy(), rtol=1e-6, atol=1e-7)
    check_value(name, out.numpy(), s16.float().numpy(), t16.float().numpy(), 2.0)
    # bf16 gradient flows back in bf16 and is finite
    s16.requires_grad_(True)
    g = torch.autograd.grad(divergence(name, s16, t16).sum(), s16)[0]
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


@pytest.mark.parametrize("name", ALL)
def test_float64_in_float64_out(name):
    student, teacher = _random_pair((3, 40), 1.0, "independent", seed=19)
    out = divergence(name, _t(student, torch.float64), _t(teacher, torch.float64), temperature=2.0)
    assert out.dtype == torch.float64
    check_value(name, out.numpy(), student, teacher, 2.0, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_identical_distributions_give_zero(name, scale, temperature):
    rng = np.random.default_rng(23)
    logits = (rng.standard_normal((2, 3, 500)) * scale).astype(np.float32)
    x = _t(logits, grad=True)
    out = divergence(name, x, x.detach().clone(), temperature=temperature)
    assert out.abs().max().item() <= 1e-6
    # equal distributions from logits differing by a per-position constant
    shifted = x.detach() + torch.tensor([[[3.0]], [[-7.0]]])
    assert divergence(name, x.detach(), shifted, temperature=temperature).abs().max().item() <= 1e-6
    g = torch.autograd.grad(out.sum(), x)[0]
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"), [((2, 5), (2, 6)), ((3, 7), (2, 7)), ((2, 3, 11), (2, 11))]
)
def test_shape_mismatch_raises_with_both_shapes(name, student_shape, teacher_shape):
    with pytest.raises(ValueError) as info:
        divergence(name, torch.zeros(student_shape), torch.zeros(teacher_shape))
    message = str(info.value)
    assert str(student_shape) in message and str(teacher_shape) in message


# ----------------------------------------------------------------------------------------------------------
# hypothesis properties
# ----------------------------------------------------------------------------------------------------------

_finite = st.floats(-8.0, 8.0, allow_nan=False, width=32)


@st.composite
def logit_pairs(draw, allow_masked: bool = False):
    vocab = draw(st.integers(2, 12))
    rows = draw(st.integers(1, 3))
    s = np.array(draw(st.lists(_finite, min_size=rows * vocab, max_size=rows * vocab)), dtype=np.float32)
    t = np.array(draw(st.lists(_finite, min_size=rows * vocab, max_size=rows * vocab)), dtype=np.float32)
    s, t = s.reshape(rows, vocab), t.reshape(rows, vocab)
    if allow_masked:
        mask_s = np.array(draw(st.lists(st.booleans(), min_size=rows * vocab, max_size=rows * vocab)))
        mask_t = np.array(draw(st.lists(st.booleans(), min_size=rows * vocab, max_size=rows * vocab)))
        s[mask_s.reshape(rows, vocab)] = -np.inf
        t[mask_t.reshape(rows, vocab)] = -np.inf
    return s, t


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_property_non_negative(pair, temperature):
    s, t = pair
    for name in ALL:
        out = divergence(name, _t(s), _t(t), temperature=temperature)
        assert (out >= -1e-6).all(), name


@settings(max_examples=30, deadline=None)
@given(pair=logit_pairs(), shift=st.floats(-5.0, 5.0))
def test_property_equal_distributions_give_zero(pair, shift):
    s, _ = pair
    for name in ALL:
        assert divergence(name, _t(s), _t(s)).abs().max().item() <= 1e-6, name
        assert divergence(name, _t(s, torch.float64), _t(s, torch.float64) + shift).abs().max() <= 1e-12, name


@settings(max_examples=40, deadline=None)
@given(
    base=st.lists(st.floats(-3.0, 3.0), min_size=2, max_size=10),
    data=st.data(),
)
def test_property_different_distributions_give_positive(base, data):
    vocab = len(base)
    delta = np.array(data.draw(st.lists(st.floats(-2.0, 2.0), min_size=vocab, max_size=vocab)))
    # ensure the change is not a constant shift (which leaves the softmax unchanged): range >= 0.5
    if np.ptp(delta) < 0.5:
        delta[np.argmin(delta)] -= 0.5
    t = torch.tensor(base, dtype=torch.float64)
    s = t + torch.tensor(delta, dtype=torch.float64)
    for name in ALL:
        assert divergence(name, s, t).item() > 0, name


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(allow_masked=True), temperature=st.sampled_from([1.0, 2.0]))
def test_property_finite_values_and_gradients_with_masked_entries(pair, temperature):
    s_np, t_np = pair
    for name in ALL:
        s, t = _t(s_np, grad=True), _t(t_np, grad=True)
        out = divergence(name, s, t, temperature=temperature)
        assert torch.isfinite(out).all(), name
        assert (out >= -1e-6).all(), name
        gs, gt = torch.autograd.grad(out.sum(), (s, t))
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all(), name
        check_value(name, out.detach().numpy(), s_np, t_np, temperature, atol=1e-5)
