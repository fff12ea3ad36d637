"""Tests of :func:`todi.losses.objective.distillation_loss` against float64 references written here.

Spec: loss = (1 - kd_rate) * CE(student at T = 1, labels) + kd_rate * KD(student, teacher at T), both
SUMMED over the supervised positions (label != ignore_index) and divided by num_items_in_batch when given,
else by this call's supervised count. The temperature divides both logit sets (no T^2 factor).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import IGNORE, ref_log_softmax, ref_todi_share, sigmoid
from todi.losses.objective import LossOutput, distillation_loss

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ----------------------------------------------------------------------------------------------------------
# float64 references, written from the spec (never calling the code under test)
# ----------------------------------------------------------------------------------------------------------
# (ref_log_softmax, sigmoid and ref_todi_share are in helpers.py)


def ref_kd_per_position(name: str, student: np.ndarray, teacher: np.ndarray, T: float, beta: float = 1.0):
    lq, lp = ref_log_softmax(student / T), ref_log_softmax(teacher / T)
    p, q = np.exp(lp), np.exp(lq)
    if name == "fkl":
        return (p * (lp - lq)).sum(-1)
    if name == "rkl":
        return (q * (lq - lp)).sum(-1)
    if name == "js":
        log_m = np.log((p + q) / 2)
        return 0.5 * (p * (lp - log_m)).sum(-1) + 0.5 * (q * (lq - log_m)).sum(-1)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "todi":
        a = sigmoid(beta * (lp - lq))
        return (a * p * (lp - lq) + (1 - a) * q * (lq - lp)).sum(-1)
    raise AssertionError(name)


def ref_objective(student, teacher, labels, *, name="todi", kd_rate=0.5, T=2.0, ignore=IGNORE, n=None, **kw):
    """(loss, ce, kd, num_tokens, mean todi share) in float64."""
    student = np.asarray(student, dtype=np.float64)
    labels = np.asarray(labels)
    vocab = student.shape[-1]
    keep = labels.reshape(-1) != ignore
    rows = student.reshape(-1, vocab)[keep]
    targets = labels.reshape(-1)[keep]
    ce_sum = float(-ref_log_softmax(rows)[np.arange(len(targets)), targets].sum())
    kd_sum, share = 0.0, None
    if teacher is not None:
        t_rows = np.asarray(teacher, dtype=np.float64).reshape(-1, vocab)[keep]
        kd_sum = float(ref_kd_per_position(name, rows, t_rows, T, **kw).sum())
        if name == "todi":
            share = float(ref_todi_share(rows, t_rows, T, **kw).mean()) if keep.any() else None
    denom = max(int(keep.sum()), 1) if n is None else n
    loss = ((1 - kd_rate) * ce_sum + kd_rate * kd_sum) / denom
    return loss, ce_sum / denom, kd_sum / denom, int(keep.sum()), share


def _batch(seed: int, shape=(3, 5), vocab: int = 11, scale: float = 2.0, masked=((0, 0), (0, 1), (2, 4))):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, vocab, generator=g) * scale
    teacher = torch.randn(*shape, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, shape, generator=g)
    for index in masked:
        labels[index] = IGNORE
    return student, teacher, labels


def _close(actual, expected, rtol=1e-5, atol=1e-6) -> None:
    actual = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    assert math.isfinite(actual)
    assert abs(actual - expected) <= rtol * abs(expected) + atol, (actual, expected)


# ----------------------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------------------


def test_hand_computed_two_item_example():
    # student logits (0, 0): q = (1/2, 1/2); teacher logits (2 log 3, 0) at T = 2: p = (3/4, 1/4); label 0.
    # CE (T = 1) = log 2.  FKL = 3/4 log(3/2) + 1/4 log(1/2).  ToDi at beta = 1 = sum (p - q) log(p / q)
    # = 1/4 log(3/2) - 1/4 log(1/2) = 1/4 log 3.  ToDi share: a = p / (p + q) = (3/5, 1/3),
    # c = (p - q) log(p / q) = (1/4 log 3/2, 1/4 log 2), share = (3/5 c1 + 1/3 c2) / (c1 + c2).
    student = torch.tensor([[0.0, 0.0], [5.0, -5.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, 2.0]], dtype=torch.float64)
    labels = torch.tensor([0, IGNORE])
    ce = math.log(2.0)
    fkl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    todi = 0.25 * math.log(3.0)
    c1, c2 = 0.25 * math.log(1.5), 0.25 * math.log(2.0)
    share = (0.6 * c1 + c2 / 3) / (c1 + c2)

    out = distillation_loss(student, teacher, labels, divergence="fkl", kd_rate=0.5, temperature=2.0)
    assert out.loss.item() == pytest.approx(0.5 * ce + 0.5 * fkl, rel=1e-12)
    assert float(out.ce) == pytest.approx(ce, rel=1e-12)
    assert float(out.kd) == pytest.approx(fkl, rel=1e-12)
    assert out.num_tokens == 1 and isinstance(out.num_tokens, int)
    assert out.todi_weight is None

    out = distillation_loss(student, teacher, labels, kd_rate=0.25)  # defaults: todi, T = 2, beta = 1
    assert out.loss.item() == pytest.approx(0.75 * ce + 0.25 * todi, rel=1e-12)
    assert float(out.kd) == pytest.approx(todi, rel=1e-12)
    assert float(out.todi_weight) == pytest.approx(share, rel=1e-12)


@pytest.mark.parametrize("name", ["todi", "fkl", "rkl", "js", "tvd"])
@pytest.mark.parametrize(("kd_rate", "temperature"), [(0.5, 2.0), (0.3, 1.0), (1.0, 3.0), (0.0, 2.0)])
def test_matches_float64_reference(name, kd_rate, temperature):
    student, teacher, labels = _batch(seed=1)
    student.requires_grad_(True)
    out = distillation_loss(
        student, teacher, labels, divergence=name, kd_rate=kd_rate, temperature=temperature
    )
    student = student.detach()
    loss, ce, kd, n, share = ref_objective(
        student.numpy(), teacher.numpy(), labels.numpy(), name=name, kd_rate=kd_rate, T=temperature
    )
    assert isinstance(out, LossOutput)
    assert out.loss.dim() == 0 and out.loss.requires_grad
    assert not out.ce.requires_grad and not out.kd.requires_grad
    _close(out.loss, loss)
    # The spec does not say whether the unweighted part is reported when its weight is 0 (the code skips
    # CE at kd_rate == 1), so each part is checked only where it enters the loss.
    if kd_rate < 1:
        _close(out.ce, ce)
    if kd_rate > 0:
        _close(out.kd, kd)
    assert out.num_tokens == n == 12
    assert out.loss.item() == pytest.approx((1 - kd_rate) * float(out.ce) + kd_rate * float(out.kd), rel=1e-6)
    if name == "todi":
        _close(out.todi_weight, share)
    else:
        assert out.todi_weight is None


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
def test_todi_weight_metric_is_mean_reference_share(beta):
    student, teacher, labels = _batch(seed=2, shape=(4, 6), vocab=50, scale=3.0)
    out = distillation_loss(student, teacher, labels, temperature=1.5, beta=beta)
    *_, share = ref_objective(student.numpy(), teacher.numpy(), labels.numpy(), T=1.5, beta=beta)
    _close(out.todi_weight, share)
    assert 0.0 <= float(out.todi_weight) <= 1.0
    metrics = out.metrics()
    assert set(metrics) == {"loss", "ce", "kd", "num_tokens", "todi_weight"}
    assert metrics["todi_weight"] == pytest.approx(float(out.todi_weight))
    assert metrics["num_tokens"] == out.num_tokens == 21
    assert metrics["loss"] == pytest.approx(out.loss.item())
    assert all(isinstance(v, float) for v in metrics.values())


def test_metrics_without_todi_weight():
    student, teacher, labels = _batch(seed=3)
    metrics = distillation_loss(student, teacher, labels, divergence="js").metrics()
    assert set(metrics) == {"loss", "ce", "kd", "num_tokens"}


def test_default_temperature_is_two_on_both_sets_without_t_squared():
    student, teacher, labels = _batch(seed=4, vocab=30, scale=3.0)
    out = distillation_loss(student, teacher, labels, kd_rate=1.0)  # default divergence todi, T = 2
    _, _, kd2, n, share2 = ref_objective(student.numpy(), teacher.numpy(), labels.numpy(), kd_rate=1.0, T=2.0)
    _close(out.kd, kd2)
    _close(out.loss, kd2)
    _close(out.todi_weight, share2)
    # not T = 1, not T^2-scaled, not the temperature on one side only
    _, _, kd1, *_ = ref_objective(student.numpy(), teacher.numpy(), labels.numpy(), kd_rate=1.0, T=1.0)
    assert abs(float(out.kd) - kd1) > 1e-2 * kd2
    assert abs(float(out.kd) - 4 * kd2) > 1e-2 * kd2
    keep = labels.reshape(-1) != IGNORE
    s_rows = student.double().reshape(-1, 30)[keep].numpy()
    t_rows = teacher.double().reshape(-1, 30)[keep].numpy()
    one_sided = ref_kd_per_position("todi", s_rows * 2.0, t_rows, 2.0).mean()  # teacher scaled, student not
    assert abs(float(out.kd) - one_sided) > 1e-2 * kd2
    # CE uses temperature 1 whatever the KD temperature
    for temperature in (0.5, 2.0, 7.0):
        out = distillation_loss(student, teacher, labels, kd_rate=0.0, temperature=temperature)
        _close(out.loss, ref_objective(student.numpy(), None, labels.numpy(), kd_rate=0.0)[0])
    assert n == 12


@pytest.mark.parametrize("name", ["todi", "fkl"])
def test_gradient_matches_float64_reference(name):
    # float64 through the code, reference gradient by autograd of the formula written here; for todi the
    # weight a is a stop-gradient, so the reference computes it once and holds it constant.
    student, teacher, labels = _batch(seed=5, vocab=9)
    s = student.double().requires_grad_(True)
    t = teacher.double()
    kd_rate, T = 0.4, 2.0
    out = distillation_loss(s, t, labels, divergence=name, kd_rate=kd_rate, temperature=T)
    (grad,) = torch.autograd.grad(out.loss, s)

    s_ref = student.double().requires_grad_(True)
    keep = labels != IGNORE
    lq1 = torch.log_softmax(s_ref, -1)
    ce = -lq1.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep].sum()
    lq, lp = torch.log_softmax(s_ref / T, -1), torch.log_softmax(t / T, -1)
    if name == "fkl":
        kd_rows = (lp.exp() * (lp - lq)).sum(-1)
    else:
        a = torch.sigmoid(lp - lq).detach()
        kd_rows = (a * lp.exp() * (lp - lq) + (1 - a) * lq.exp() * (lq - lp)).sum(-1)
    ref_loss = ((1 - kd_rate) * ce + kd_rate * kd_rows[keep].sum()) / keep.sum()
    (ref_grad,) = torch.autograd.grad(ref_loss, s_ref)
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad.numpy(), rtol=1e-9, atol=1e-12)
    assert (grad[~keep] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# ignore_index
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["todi", "fkl", "tvd"])
def test_ignored_positions_contribute_nothing(name):
    student, teacher, labels = _batch(seed=6)
    s = student.clone().requires_grad_(True)
    out = distillation_loss(s, teacher, labels, divergence=name)
    (grad,) = torch.autograd.grad(out.loss, s)
    ignored = labels == IGNORE
    assert (grad[ignored] == 0).all()
    assert (grad[~ignored] != 0).any()

    # changing logits at ignored positions (even to garbage) leaves loss, parts and gradient unchanged
    s2, t2 = student.clone(), teacher.clone()
    s2[ignored] = torch.randn(int(ignored.sum()), student.shape[-1]) * 50
    t2[ignored] = torch.randn(int(ignored.sum()), student.shape[-1]) * 50
    s2.requires_grad_(True)
    out2 = distillation_loss(s2, t2, labels, divergence=name)
    (grad2,) = torch.autograd.grad(out2.loss, s2)
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert float(out2.ce) == pytest.approx(float(out.ce), rel=1e-6)
    assert float(out2.kd) == pytest.approx(float(out.kd), rel=1e-6)
    np.testing.assert_allclose(grad2[~ignored].numpy(), grad[~ignored].numpy(), rtol=1e-5, atol=1e-8)

    # and the result equals the loss on the supervised rows alone
    keep = ~ignored
    out3 = distillation_loss(student[keep], teacher[keep], labels[keep], divergence=name)
    assert out3.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert out3.num_tokens == out.num_tokens == int(keep.sum())


def test_custom_ignore_index():
    student, teacher, labels = _batch(seed=7)
    labels = torch.where(labels == IGNORE, torch.full_like(labels, -1), labels)
    out = distillation_loss(student, teacher, labels, ignore_index=-1)
    loss, _, _, n, share = ref_objective(student.numpy(), teacher.numpy(), labels.numpy(), ignore=-1)
    _close(out.loss, loss)
    _close(out.todi_weight, share)
    assert out.num_tokens == n == 12
    # a real token id used as ignore_index drops exactly those positions
    target = int(labels[1, 2])
    out = distillation_loss(student, teacher, labels.clamp_min(0), ignore_index=target)
    loss, *_, n, _ = ref_objective(
        student.numpy(), teacher.numpy(), labels.clamp_min(0).numpy(), ignore=target
    )
    _close(out.loss, loss)
    assert out.num_tokens == n


@pytest.mark.parametrize("name", ["todi", "fkl", "js"])
@pytest.mark.parametrize("num_items", [None, 0, 7, torch.tensor(7)])
def test_no_supervised_position_gives_zero_loss_and_zero_gradients(name, num_items):
    student, teacher, labels = _batch(seed=8)
    labels = torch.full_like(labels, IGNORE)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    out = distillation_loss(s, t, labels, divergence=name, num_items_in_batch=num_items)
    assert out.num_tokens == 0
    assert out.loss.item() == 0.0 and float(out.ce) == 0.0 and float(out.kd) == 0.0
    gs, gt = torch.autograd.grad(out.loss, (s, t), allow_unused=True)
    assert gs is not None and torch.equal(gs, torch.zeros_like(gs))
    assert gt is None or torch.equal(gt, torch.zeros_like(gt))
    assert all(math.isfinite(v) for k, v in out.metrics().items() if k != "todi_weight")


# ----------------------------------------------------------------------------------------------------------
# num_items_in_batch: gradient accumulation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["todi", "fkl", "js"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_half_batches_with_global_count_sum_to_full_batch(name, as_tensor):
    # uneven supervision: the first half (rows 0-1) has 2 supervised tokens, the second half 6
    student, teacher, labels = _batch(seed=9, shape=(4, 3), vocab=13, masked=[(0, 0), (0, 1), (0, 2), (1, 0)])
    total = int((labels != IGNORE).sum())
    assert int((labels[:2] != IGNORE).sum()) == 2 and total == 8

    x = student.clone().requires_grad_(True)
    full = distillation_loss(x, teacher, labels, divergence=name)
    (g_full,) = torch.autograd.grad(full.loss, x)

    n = torch.tensor(total) if as_tensor else total
    parts = [
        distillation_loss(x[:2], teacher[:2], labels[:2], divergence=name, num_items_in_batch=n),
        distillation_loss(x[2:], teacher[2:], labels[2:], divergence=name, num_items_in_batch=n),
    ]
    grads = [torch.autograd.grad(part.loss, x)[0] for part in parts]

    assert (parts[0].loss + parts[1].loss).item() == pytest.approx(full.loss.item(), rel=1e-6)
    assert float(parts[0].ce + parts[1].ce) == pytest.approx(float(full.ce), rel=1e-6)
    assert float(parts[0].kd + parts[1].kd) == pytest.approx(float(full.kd), rel=1e-6)
    assert parts[0].num_tokens + parts[1].num_tokens == full.num_tokens == total
    np.testing.assert_allclose((grads[0] + grads[1]).numpy(), g_full.numpy(), rtol=1e-5, atol=1e-8)

    # each half is the half's supervised sum / the global count
    for part, sl in zip(parts, (slice(0, 2), slice(2, 4))):
        ref = ref_objective(student[sl].numpy(), teacher[sl].numpy(), labels[sl].numpy(), name=name, n=total)
        _close(part.loss, ref[0])
        _close(part.kd, ref[2])

    # the test is meaningful: per-call normalisation would not add up
    local = [
        distillation_loss(x[:2], teacher[:2], labels[:2], divergence=name),
        distillation_loss(x[2:], teacher[2:], labels[2:], divergence=name),
    ]
    assert abs((local[0].loss + local[1].loss).item() - full.loss.item()) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# kd_rate, teacher None, errors
# ----------------------------------------------------------------------------------------------------------


def test_kd_rate_zero_with_teacher_none_is_plain_cross_entropy():
    student, _, labels = _batch(seed=10)
    s = student.clone().requires_grad_(True)
    out = distillation_loss(s, None, labels, kd_rate=0.0)
    loss, ce, *_ = ref_objective(student.numpy(), None, labels.numpy(), kd_rate=0.0)
    _close(out.loss, loss)
    _close(out.ce, ce)
    assert float(out.kd) == 0.0
    (grad,) = torch.autograd.grad(out.loss, s)
    s_ref = student.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(s_ref.reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    np.testing.assert_allclose(grad.numpy(), g_ref.numpy(), rtol=1e-5, atol=1e-8)
    # same value as kd_rate = 0 with a teacher
    _, teacher, _ = _batch(seed=10)
    _close(distillation_loss(student, teacher, labels, kd_rate=0.0).loss, loss)


def test_kd_rate_one_ignores_cross_entropy():
    student, teacher, labels = _batch(seed=11)
    out = distillation_loss(student, teacher, labels, divergence="fkl", kd_rate=1.0, temperature=1.0)
    _, _, kd, *_ = ref_objective(student.numpy(), teacher.numpy(), labels.numpy(), name="fkl", T=1.0)
    _close(out.loss, kd)


@pytest.mark.parametrize("kd_rate", [-0.1, -1e-9, 1.0 + 1e-6, 1.5, float("nan")])
def test_invalid_kd_rate_raises(kd_rate):
    student, teacher, labels = _batch(seed=12)
    with pytest.raises(ValueError):
        distillation_loss(student, teacher, labels, kd_rate=kd_rate)


@pytest.mark.parametrize("temperature", [0.0, -1.0, -1e-9])
def test_invalid_temperature_raises(temperature):
    student, teacher, labels = _batch(seed=12)
    with pytest.raises(ValueError):
        distillation_loss(student, teacher, labels, temperature=temperature)


def test_boundary_kd_rates_are_valid():
    student, teacher, labels = _batch(seed=12)
    for kd_rate in (0.0, 1.0):
        assert math.isfinite(float(distillation_loss(student, teacher, labels, kd_rate=kd_rate).loss))


def test_vocab_mismatch_raises_with_both_shapes():
    student, teacher, labels = _batch(seed=13)
    with pytest.raises(ValueError) as info:
        distillation_loss(student, teacher[..., :-1], labels)
    assert str(tuple(student.shape)) in str(info.value)
    assert str(tuple(teacher[..., :-1].shape)) in str(info.value)


def test_unknown_divergence_parameter_raises():
    student, teacher, labels = _batch(seed=14)
    with pytest.raises(ValueError):
        distillation_loss(student, teacher, labels, divergence="fkl", beta=2.0)
    with pytest.raises(ValueError):
        distillation_loss(student, teacher, labels, divergence="todi", skew=0.1)


# ----------------------------------------------------------------------------------------------------------
# dtypes and masked vocabulary
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["todi", "fkl", "akl"])
def test_bf16_logits_give_float32_close_to_float32_of_same_values(name):
    student, teacher, labels = _batch(seed=15, vocab=64)
    s16, t16 = student.bfloat16(), teacher.bfloat16()
    out16 = distillation_loss(s16, t16, labels, divergence=name)
    out32 = distillation_loss(s16.float(), t16.float(), labels, divergence=name)
    assert out16.loss.dtype == torch.float32
    assert out16.loss.item() == pytest.approx(out32.loss.item(), rel=1e-5)
    assert float(out16.kd) == pytest.approx(float(out32.kd), rel=1e-5)
    s = s16.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(distillation_loss(s, t16, labels, divergence=name).loss, s)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


def test_masked_teacher_vocabulary_is_finite():
    # a padded teacher head: the last 3 vocabulary entries are -inf for the teacher only
    student, teacher, labels = _batch(seed=16, vocab=12)
    teacher[..., -3:] = -math.inf
    s = student.clone().requires_grad_(True)
    out = distillation_loss(s, teacher, labels, kd_rate=1.0)
    assert math.isfinite(out.loss.item())
    (grad,) = torch.autograd.grad(out.loss, s)
    assert torch.isfinite(grad).all()
    assert (grad[..., -3:] == 0).all()
    # equal to the loss on the 9 shared entries (kd_rate = 1: no CE over the full student vocabulary)
    labels9 = labels.clamp_max(8).masked_fill(labels == IGNORE, IGNORE)
    ref = ref_objective(student[..., :9].numpy(), teacher[..., :9].numpy(), labels9.numpy(), kd_rate=1.0)
    _close(out.loss, ref[0])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kd_rate=st.floats(0.0, 1.0),
    temperature=st.floats(0.5, 4.0),
    name=st.sampled_from(["todi", "fkl", "rkl", "js", "tvd", "skl", "srkl", "akl"]),
    supervised=st.integers(0, 15),
)
def test_property_loss_decomposes_and_is_finite(seed, kd_rate, temperature, name, supervised):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(3, 5, 7, generator=g) * 3).requires_grad_(True)
    teacher = torch.randn(3, 5, 7, generator=g) * 3
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels.view(-1)[torch.randperm(15, generator=g)[supervised:]] = IGNORE
    out = distillation_loss(
        student, teacher, labels, divergence=name, kd_rate=kd_rate, temperature=temperature
    )
    assert out.num_tokens == supervised
    assert out.loss.item() == pytest.approx((1 - kd_rate) * float(out.ce) + kd_rate * float(out.kd), abs=1e-5)
    assert float(out.kd) >= -1e-6 and float(out.ce) >= 0
    (grad,) = torch.autograd.grad(out.loss, student)
    assert torch.isfinite(grad).all()
    assert (grad[labels == IGNORE] == 0).all()
