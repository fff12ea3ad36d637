"""Helpers shared by the loss tests, one copy each (importable because pytest puts this folder on sys.path,
as for tiny.py): the norm-relative check, random linear-head inputs, the sparse-teacher problem, and float64
numpy references written from the formulas (never calling the code under test)."""

from __future__ import annotations

import math

import numpy as np
import torch

IGNORE = -100  # the label of a position without a target
# Non-default parameters of the parameterised divergences.
PARAMS = {"todi": {"beta": 2.0}, "skl": {"skew": 0.2}, "srkl": {"skew": 0.2}, "akl": {"mu": 0.3}}
# The keys of make_inputs' tensors, per model.
STUDENT = ("student_hidden", "student_weight", "student_bias")
TEACHER = ("teacher_hidden", "teacher_weight", "teacher_bias")


def assert_rel(actual, expected, rtol: float, name: str = "") -> None:
    """Norm-relative error <= rtol, compared on the CPU in float64; ``actual`` must be finite (an exact-zero
    reference needs an (almost) exact zero: the absolute slack is 1e-12)."""
    a = torch.as_tensor(actual).detach().cpu().double()
    e = torch.as_tensor(expected).detach().cpu().double()
    assert a.shape == e.shape, (name, a.shape, e.shape)
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err, scale = float((a - e).norm()), float(e.norm())
    assert err <= rtol * scale + 1e-12, (
        f"{name}: |diff| = {err:.3e}, |ref| = {scale:.3e}, rel = {err / max(scale, 1e-30):.3e} > {rtol:.1e}"
    )


def make_inputs(
    n: int = 40,
    h_s: int = 16,
    h_t: int = 24,
    vocab: int = 61,
    *,
    num_ignored: int = 0,
    student_bias: bool = False,
    teacher_bias: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor | None]:
    """Random student / teacher hidden states and heads (keys STUDENT + TEACHER, drawn in ``dtype`` in that
    order) and ``labels`` of which exactly ``num_ignored`` are IGNORE."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    inputs: dict[str, torch.Tensor | None] = {
        "student_hidden": randn(n, h_s),
        "student_weight": randn(vocab, h_s, scale=1.5 / math.sqrt(h_s)),
        "student_bias": randn(vocab, scale=0.5) if student_bias else None,
        "teacher_hidden": randn(n, h_t),
        "teacher_weight": randn(vocab, h_t, scale=2.0 / math.sqrt(h_t)),
        "teacher_bias": randn(vocab, scale=0.5) if teacher_bias else None,
    }
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[:num_ignored]] = IGNORE
    inputs["labels"] = labels
    return inputs


def materialised_logits(inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``hidden @ weight.T (+ bias)`` for the student, and for the teacher (without gradient) if it has one."""
    student = inputs["student_hidden"] @ inputs["student_weight"].T
    if inputs["student_bias"] is not None:
        student = student + inputs["student_bias"]
    teacher = None
    if inputs.get("teacher_hidden") is not None:
        with torch.no_grad():
            teacher = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
            if inputs["teacher_bias"] is not None:
                teacher = teacher + inputs["teacher_bias"]
    return student, teacher


def sparse_problem(
    n: int = 23, vocab: int = 37, hidden: int = 8, *, seed: int = 0, ignored: tuple[int, ...] = (0, 4, 9)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the sparse (cached) teacher: float64 student hidden states and head, teacher logits, and labels
    that are IGNORE at the rows ``ignored``."""
    g = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[list(ignored)] = IGNORE
    return hidden_states, weight, teacher, labels


# ----------------------------------------------------------------------------------------------------------
# float64 numpy references
# ----------------------------------------------------------------------------------------------------------


def ref_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def ref_todi_share(student: np.ndarray, teacher: np.ndarray, T: float = 1.0, beta: float = 1.0) -> np.ndarray:
    """ToDi's FKL share per position: sum_v a_v c_v / sum_v c_v with c_v = (a_v p_v - (1 - a_v) q_v)
    log(p_v / q_v), at temperature T; 1/2 where sum_v c_v == 0."""
    lq, lp = ref_log_softmax(student / T), ref_log_softmax(teacher / T)
    p, q = np.exp(lp), np.exp(lq)
    a = sigmoid(beta * (lp - lq))
    c = (a * p - (1.0 - a) * q) * (lp - lq)
    total = c.sum(-1)
    return np.where(total > 0, (a * c).sum(-1) / np.where(total > 0, total, 1.0), 0.5)
