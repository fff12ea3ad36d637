"""ToDi's weight rules (``weight`` = sigmoid / hard / constant / inverse) against float64 references
written here from the formulas, in every path that computes ToDi: the divergence and its closed-form
gradient, the materialised objective, the fused chunked loss, and the sparse (cached) teacher in the
materialised and fused paths. Gradients are checked against central finite differences of the numpy
reference with the weight a frozen at the evaluation point (the stop-gradient the method prescribes).

    a = sigmoid(beta d) | 1[d > 0] | 1/2 | sigmoid(-beta d),  d = log p - log q
    D = sum_v a p (log p - log q) + (1 - a) q (log q - log p)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from helpers import IGNORE, ref_log_softmax, sigmoid
from todi.divergences import TODI_WEIGHTS, divergence, get_divergence, todi_weight
from todi.losses import SparseTeacher, distillation_loss, fused_linear_distillation_loss

T = 2.0
KD_RATE = 0.7
RULES = [
    ("sigmoid", 1.0),
    ("sigmoid", 2.5),
    ("hard", 1.0),
    ("constant", 1.0),
    ("inverse", 1.0),
    ("inverse", 0.5),
    ("inverse", 2.0),
]


def ref_a(d: np.ndarray, rule: str, beta: float) -> np.ndarray:
    if rule == "sigmoid":
        return sigmoid(beta * d)
    if rule == "hard":
        return (d > 0).astype(np.float64)
    if rule == "constant":
        return np.full_like(d, 0.5)
    assert rule == "inverse"
    return sigmoid(-beta * d)


def ref_todi(lq: np.ndarray, lp: np.ndarray, a: np.ndarray) -> np.ndarray:
    p, q = np.exp(lp), np.exp(lq)
    return (a * p * (lp - lq) + (1.0 - a) * q * (lq - lp)).sum(-1)


def ref_share(lq: np.ndarray, lp: np.ndarray, a: np.ndarray, rule: str, beta: float) -> np.ndarray:
    """sum a c / sum c with c = (a p - (1 - a) q) d; 1/2 where c sums to 0, and for the inverse rule at
    beta = 1, whose c is 0 for every token."""
    if rule == "inverse" and beta == 1.0:
        return np.full(lq.shape[:-1], 0.5)
    c = (a * np.exp(lp) - (1.0 - a) * np.exp(lq)) * (lp - lq)
    total = c.sum(-1)
    return np.where(total != 0, (a * c).sum(-1) / np.where(total != 0, total, 1.0), 0.5)


Outcomes = Callable[[np.ndarray], np.ndarray]  # [N, V] student logits -> student log-probs over outcomes


class Reference:
    """The objective ((1 - kd_rate) CE + kd_rate D) / N over the kept rows of ``[N, V]`` student logits z:
    D between ``teacher_lp`` (teacher log-probs over the outcomes, at T) and ``student_lp(z)``."""

    def __init__(self, z0: np.ndarray, targets: np.ndarray, teacher_lp: np.ndarray, student_lp: Outcomes,
                 rule: str, beta: float) -> None:  # fmt: skip
        self.z0, self.targets, self.lp, self.student_lp = z0, targets, teacher_lp, student_lp
        self.a0 = ref_a(teacher_lp - student_lp(z0), rule, beta)  # frozen: the stop-gradient
        self.rule, self.beta = rule, beta

    def loss(self, z: np.ndarray) -> float:
        ce = (np.log(np.exp(z).sum(-1)) - z[np.arange(len(z)), self.targets]).sum()
        kd = ref_todi(self.student_lp(z), self.lp, self.a0).sum()
        return ((1.0 - KD_RATE) * ce + KD_RATE * kd) / len(z)

    def grad(self, eps: float = 1e-6) -> np.ndarray:
        g = np.zeros_like(self.z0)
        for idx in np.ndindex(*self.z0.shape):
            up, down = self.z0.copy(), self.z0.copy()
            up[idx] += eps
            down[idx] -= eps
            g[idx] = (self.loss(up) - self.loss(down)) / (2 * eps)
        return g

    def share(self) -> float:
        return float(ref_share(self.student_lp(self.z0), self.lp, self.a0, self.rule, self.beta).mean())


def dense_outcomes(z: np.ndarray) -> np.ndarray:
    return ref_log_softmax(z / T)


def _problem(seed: int = 0, n: int = 9, vocab: int = 13, hidden: int = 5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    t_hidden = torch.randn(n, hidden + 2, generator=g, dtype=torch.float64)
    t_weight = torch.randn(vocab, hidden + 2, generator=g, dtype=torch.float64) * 1.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[[1, 6]] = IGNORE
    return h, w, t_hidden, t_weight, labels


def assert_close(actual, expected, rtol: float) -> None:
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    err = np.linalg.norm(a - e)
    assert err <= rtol * np.linalg.norm(e) + 1e-12, f"|diff| {err:.3e} vs |ref| {np.linalg.norm(e):.3e}"


def test_rules_are_the_documented_parameter():
    entry = get_divergence("todi")
    assert entry.params == {"beta": 1.0, "weight": "sigmoid"}
    assert TODI_WEIGHTS == ("sigmoid", "hard", "constant", "inverse")
    assert entry.resolve({"weight": "hard", "beta": 2})["weight"] == "hard"
    with pytest.raises(ValueError, match="weight='soft' is not one of sigmoid, hard, constant, inverse"):
        entry.resolve({"weight": "soft"})


@pytest.mark.parametrize("rule,beta", RULES)
def test_divergence_value_gradient_and_share(rule, beta):
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(7, 11, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(7, 11, generator=g, dtype=torch.float64) * 2
    lp = ref_log_softmax(t.numpy() / T)
    a0 = ref_a(lp - dense_outcomes(s.detach().numpy()), rule, beta)

    def per_row(z: np.ndarray) -> np.ndarray:
        return ref_todi(dense_outcomes(z), lp, a0)

    value = divergence("todi", s, t, temperature=T, beta=beta, weight=rule)
    np.testing.assert_allclose(value.detach().numpy(), per_row(s.detach().numpy()), rtol=1e-10, atol=1e-13)
    grad = torch.autograd.grad(value.sum(), s)[0].numpy()
    z0, eps, fd = s.detach().numpy(), 1e-6, np.zeros((7, 11))
    for idx in np.ndindex(7, 11):
        up, down = z0.copy(), z0.copy()
        up[idx] += eps
        down[idx] -= eps
        fd[idx] = (per_row(up).sum() - per_row(down).sum()) / (2 * eps)
    assert_close(grad, fd, 1e-7)
    # The closed form the fused loss uses: value and gradient w.r.t. the scaled logits s / T.
    ls, lt = torch.log_softmax(s.detach() / T, -1), torch.log_softmax(t / T, -1)
    closed_value, closed_grad = get_divergence("todi").value_and_grad(ls, lt, beta=beta, weight=rule)
    np.testing.assert_allclose(closed_value.numpy(), per_row(z0), rtol=1e-10, atol=1e-13)
    assert_close(closed_grad.numpy(), fd * T, 1e-7)
    share = todi_weight(ls, lt, beta, rule).numpy()
    np.testing.assert_allclose(
        share, ref_share(dense_outcomes(z0), lp, a0, rule, beta), rtol=1e-10, atol=1e-13
    )


def test_rules_differ_and_inverse_vanishes_at_beta_one():
    g = torch.Generator().manual_seed(5)
    s, t = (
        torch.randn(4, 9, generator=g, dtype=torch.float64),
        torch.randn(4, 9, generator=g, dtype=torch.float64),
    )
    values = {r: divergence("todi", s, t, weight=r) for r in TODI_WEIGHTS}
    assert len({tuple(np.round(v.numpy(), 12)) for v in values.values()}) == 4
    # a = q / (p + q) makes a p = (1 - a) q for every token: the value is 0, the gradient is not.
    np.testing.assert_allclose(values["inverse"].numpy(), 0.0, atol=1e-15)
    fkl, rkl = divergence("fkl", s, t), divergence("rkl", s, t)
    np.testing.assert_allclose(values["constant"].numpy(), (0.5 * (fkl + rkl)).numpy(), rtol=1e-12)


def test_hard_rule_sends_ties_to_rkl():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    lq = torch.log(torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64))  # token 0 is a tie
    _, grad = get_divergence("todi").value_and_grad(lq, lp, weight="hard")
    # a = (0, 1, 0): r = (1 - a) q = (0.5, 0, 0.3), a p = (0, 0.3, 0); d = (0, log 1.5, log 2/3)
    d = (lp - lq).numpy()[0]
    r, ap, q = np.array([0.5, 0.0, 0.3]), np.array([0.0, 0.3, 0.0]), np.exp(lq.numpy()[0])
    w = ap - r
    expected = r * (1 - d) - ap + q * ((r * d).sum() + w.sum())
    np.testing.assert_allclose(grad.numpy()[0], expected, rtol=1e-12)


@pytest.mark.parametrize("rule,beta", RULES)
def test_materialised_objective(rule, beta):
    h, w, th, tw, labels = _problem()
    z = (h @ w.T).requires_grad_()
    t = th @ tw.T
    keep = (labels != IGNORE).numpy()
    out = distillation_loss(
        z, t, labels, divergence="todi", kd_rate=KD_RATE, temperature=T, beta=beta, weight=rule
    )
    out.loss.backward()
    z0 = z.detach().numpy()[keep]
    ref = Reference(z0, labels.numpy()[keep], dense_outcomes(t.numpy()[keep]), dense_outcomes, rule, beta)
    assert float(out.loss.detach()) == pytest.approx(ref.loss(z0), rel=1e-10)
    assert_close(z.grad.numpy()[keep], ref.grad(), 1e-7)
    assert np.all(z.grad.numpy()[~keep] == 0)
    assert float(out.todi_weight) == pytest.approx(ref.share(), rel=1e-10)


@pytest.mark.parametrize("rule,beta", RULES)
def test_fused_objective(rule, beta):
    h, w, th, tw, labels = _problem(seed=1)
    h, w = h.float().requires_grad_(), w.float().requires_grad_()
    keep = (labels != IGNORE).numpy()
    out = fused_linear_distillation_loss(
        h, w, th.float(), tw.float(), labels, divergence="todi", kd_rate=KD_RATE, temperature=T,
        chunk_size=3, compile=False, beta=beta, weight=rule,
    )  # fmt: skip
    out.loss.backward()
    h64, w64 = h.detach().double().numpy(), w.detach().double().numpy()
    t = (th.float() @ tw.float().T).double().numpy()[keep]
    ref = Reference((h64 @ w64.T)[keep], labels.numpy()[keep], dense_outcomes(t), dense_outcomes, rule, beta)
    g_logits = ref.grad()  # d loss / d logits of the kept rows
    assert float(out.loss.detach()) == pytest.approx(ref.loss(ref.z0), rel=2e-5)
    assert_close(h.grad.numpy()[keep], g_logits @ w64, 2e-5)
    assert_close(w.grad.numpy(), g_logits.T @ h64[keep], 2e-5)
    assert float(out.todi_weight) == pytest.approx(ref.share(), rel=2e-5, abs=1e-6)


def _sparse_reference(t_logits: np.ndarray, k: int, tail_mode: str) -> tuple[np.ndarray, Outcomes]:
    """The teacher's log-probs at T over the outcomes the divergence sees, and the student's map: the k
    top ids plus one tail bucket (bucket), or all V tokens with the tail mass spread evenly (uniform)."""
    lp = ref_log_softmax(t_logits / T)
    ids = np.argsort(-t_logits, axis=-1, kind="stable")[:, :k]
    rows = np.arange(len(t_logits))[:, None]
    rest = np.ones_like(lp, dtype=bool)
    rest[rows, ids] = False

    def tail(logp: np.ndarray) -> np.ndarray:
        return np.log(np.where(rest, np.exp(logp), 0.0).sum(-1, keepdims=True))

    if tail_mode == "bucket":
        teacher = np.concatenate([lp[rows, ids], tail(lp)], axis=-1)
        return teacher, lambda z: np.concatenate(
            [dense_outcomes(z)[rows, ids], tail(dense_outcomes(z))], axis=-1
        )
    vocab = t_logits.shape[-1]
    teacher = np.where(rest, tail(lp) - np.log(vocab - k), lp)
    return teacher, dense_outcomes


@pytest.mark.parametrize("tail_mode", ["bucket", "uniform"])
@pytest.mark.parametrize("fused", [False, True], ids=["materialised", "fused"])
@pytest.mark.parametrize("rule,beta", [r for r in RULES if r != ("sigmoid", 2.5)])
def test_sparse_teacher(rule, beta, fused, tail_mode):
    h, w, th, tw, labels = _problem(seed=2)
    keep = (labels != IGNORE).numpy()
    t = (th @ tw.T)[keep]
    k = 4
    sparse = SparseTeacher.from_logits(t, k, (T,))
    sparse = SparseTeacher(sparse.ids, sparse.logprobs, sparse.tail, sparse.vocab_size, sparse.tempered_tails,
                           tail_mode=tail_mode)  # fmt: skip
    options = dict(divergence="todi", kd_rate=KD_RATE, temperature=T, beta=beta, weight=rule)
    if fused:
        h, w = h.float().requires_grad_(), w.float().requires_grad_()
        out = fused_linear_distillation_loss(
            h, w, None, None, labels, sparse_teacher=sparse, chunk_size=3, compile=False, **options
        )
        rtol = 2e-5
    else:
        h, w = h.requires_grad_(), w.requires_grad_()
        out = distillation_loss(h @ w.T, sparse, labels, **options)
        rtol = 1e-7
    out.loss.backward()
    h64, w64 = h.detach().double().numpy(), w.detach().double().numpy()
    teacher_lp, student_lp = _sparse_reference(t.double().numpy(), k, tail_mode)
    ref = Reference((h64 @ w64.T)[keep], labels.numpy()[keep], teacher_lp, student_lp, rule, beta)
    g_logits = ref.grad()
    assert float(out.loss.detach()) == pytest.approx(ref.loss(ref.z0), rel=rtol)
    assert_close(h.grad.numpy()[keep], g_logits @ w64, rtol)
    assert_close(w.grad.numpy(), g_logits.T @ h64[keep], rtol)
    assert float(out.todi_weight) == pytest.approx(ref.share(), rel=max(rtol, 1e-9), abs=1e-6)


def test_cli_option_reaches_the_loss():
    from todi.errors import UsageError
    from todi.training import DistillConfig

    config = DistillConfig(teacher="t", student="s", data="d", out="o", todi_weight="hard", beta=2.0)
    assert config.loss_options() | {} == {
        "divergence": "todi", "kd_rate": 0.5, "temperature": 2.0, "beta": 2.0, "weight": "hard"
    }  # fmt: skip
    assert DistillConfig(teacher="t", student="s", data="d", out="o").divergence_params() == {}
    with pytest.raises(UsageError, match="--todi-weight applies to --loss todi, not --loss fkl"):
        DistillConfig(teacher="t", student="s", data="d", out="o", loss="fkl", todi_weight="hard")


@pytest.mark.parametrize("beta", [1.0, 0.7])
def test_default_rule_is_the_unchanged_sigmoid_formula_bit_for_bit(beta):
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(5, 17, generator=g) * 3, torch.randn(5, 17, generator=g) * 3
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    d = lt - ls
    a = torch.sigmoid(beta * d)
    paper = ((a * lt.exp() - (1.0 - a) * ls.exp()) * d).sum(-1)  # the formula as it stood before the rules
    entry = get_divergence("todi")
    assert torch.equal(entry.fn(ls, lt, beta=beta), paper)
    assert torch.equal(entry.fn(ls, lt, beta=beta, weight="sigmoid"), paper)
    for a_, b_ in zip(
        entry.value_and_grad(ls, lt, beta=beta), entry.value_and_grad(ls, lt, beta=beta, weight="sigmoid")
    ):
        assert torch.equal(a_, b_)
