"""Tests of :func:`todi.losses.fused_linear_distillation_loss` (the chunked linear head + objective).

Every value and gradient is checked against an independent reference: the materialised computation
``distillation_loss(hidden @ weight.T (+ bias), ...)`` run through autograd, or float64 autograd through
the divergence value functions. Relative errors are norm-relative per tensor (<= 1e-5 in float32).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import todi.losses.fused as fused_mod
from helpers import IGNORE, PARAMS, STUDENT, TEACHER, assert_rel, make_inputs, materialised_logits
from todi.divergences import DIVERGENCES, LOG_FLOOR, get_divergence, masked_log_probs
from todi.losses import (
    FusedLinearDistillationLoss,
    LossOutput,
    auto_chunk_size,
    distillation_loss,
    fused_linear_distillation_loss,
)

RTOL = 1e-5
# Tiny tensors: one intra-op thread; TODI_COMPILE unset, as the tests choose the compile path explicitly.
pytestmark = pytest.mark.usefixtures("one_intra_op_thread", "no_compile_override")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _leaves(inputs: dict, teacher_grad: bool = False) -> dict:
    """Fresh leaf copies; student tensors require grad (teacher ones too when asked, to check none arrives)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().clone().requires_grad_(key in STUDENT or teacher_grad)
        out[key] = value
    return out


def run_reference(inputs: dict, backward: bool = True, **kwargs) -> tuple[LossOutput, dict]:
    leaves = _leaves(inputs)
    student, teacher = materialised_logits(leaves)
    out = distillation_loss(student, teacher, leaves["labels"], **kwargs)
    if backward:
        out.loss.backward()
    return out, {k: leaves[k].grad for k in STUDENT if leaves[k] is not None}


def call_fused(t: dict, loss_fn=None, **kwargs) -> LossOutput:
    """The fused loss (or a FusedLinearDistillationLoss module) on the tensors of ``t``; eager by default."""
    if loss_fn is None:
        loss_fn = fused_linear_distillation_loss
        kwargs.setdefault("compile", False)
    positional = (
        t["student_hidden"],
        t["student_weight"],
        t["teacher_hidden"],
        t["teacher_weight"],
        t["labels"],
    )
    return loss_fn(*positional, student_bias=t["student_bias"], teacher_bias=t["teacher_bias"], **kwargs)


def run_fused(
    inputs: dict, backward: bool = True, teacher_grad: bool = False, **kwargs
) -> tuple[LossOutput, dict]:
    leaves = _leaves(inputs, teacher_grad=teacher_grad)
    out = call_fused(leaves, **kwargs)
    if backward:
        out.loss.backward()
    if teacher_grad:
        for key in TEACHER:
            if leaves[key] is not None:
                assert leaves[key].grad is None, f"{key} received a gradient"
    return out, {k: leaves[k].grad for k in STUDENT if leaves[k] is not None}


def assert_same_output(out: LossOutput, ref: LossOutput, rtol: float = RTOL) -> None:
    assert isinstance(out, LossOutput)
    assert out.loss.dim() == 0
    assert out.num_tokens == ref.num_tokens and isinstance(out.num_tokens, int)
    assert_rel(out.loss, ref.loss, rtol, "loss")
    assert_rel(out.ce, ref.ce, rtol, "ce")
    assert_rel(out.kd, ref.kd, rtol, "kd")
    assert not out.ce.requires_grad and not out.kd.requires_grad
    if ref.todi_weight is None:
        assert out.todi_weight is None
    else:
        assert out.todi_weight is not None
        assert_rel(out.todi_weight, ref.todi_weight, rtol, "todi_weight")


def assert_same_grads(grads: dict, ref_grads: dict, rtol: float = RTOL) -> None:
    assert grads.keys() == ref_grads.keys()
    for key, expected in ref_grads.items():
        assert grads[key] is not None, f"no gradient for {key}"
        assert grads[key].dtype == expected.dtype, key
        assert_rel(grads[key], expected, rtol, key)


# ----------------------------------------------------------------------------------------------------------
# fused == materialised, every divergence
# ----------------------------------------------------------------------------------------------------------


class Case(NamedTuple):
    rows: int
    ignored: int  # rows with the ignore label
    chunk: int | None  # chunk size (None: auto_chunk_size), relative to the SUPERVISED rows (see below)
    bias: str | None  # which heads have a bias: "both", "student", "teacher" or None
    temperature: float
    with_params: bool  # the divergence's non-default PARAMS (else its defaults)


# Only the supervised rows are chunked: 28 supervised rows in chunks of 5 leave a partial chunk, in chunks of
# 7 they do not. The keys are the test ids.
CASES = {
    "ignored-chunk5-bias-both-T2-params": Case(
        rows=40, ignored=12, chunk=5, bias="both", temperature=2.0, with_params=True
    ),
    "dense-chunk8-nobias-T1": Case(
        rows=32, ignored=0, chunk=8, bias=None, temperature=1.0, with_params=False
    ),
    "ignored-chunk7-student-bias-T0.7-params": Case(
        rows=40, ignored=12, chunk=7, bias="student", temperature=0.7, with_params=True
    ),
    "dense-chunk4-teacher-bias-T3": Case(
        rows=30, ignored=0, chunk=4, bias="teacher", temperature=3.0, with_params=False
    ),
    "ignored-auto-chunk-bias-both-params": Case(
        rows=40, ignored=9, chunk=None, bias="both", temperature=2.0, with_params=True
    ),
    "ignored-chunk1-nobias-T1.5": Case(
        rows=20, ignored=5, chunk=1, bias=None, temperature=1.5, with_params=False
    ),
}


@pytest.mark.parametrize("kd_rate", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("case_id", list(CASES))
@pytest.mark.parametrize("name", DIVERGENCES)
def test_matches_materialised_loss_and_gradients(name, case_id, kd_rate):
    case = CASES[case_id]
    inputs = make_inputs(
        case.rows,
        num_ignored=case.ignored,
        student_bias=case.bias in ("both", "student"),
        teacher_bias=case.bias in ("both", "teacher"),
        seed=10 * DIVERGENCES.index(name) + list(CASES).index(case_id),
    )
    kwargs = dict(
        divergence=name,
        kd_rate=kd_rate,
        temperature=case.temperature,
        **(PARAMS.get(name, {}) if case.with_params else {}),
    )
    ref, ref_grads = run_reference(inputs, **kwargs)
    out, grads = run_fused(inputs, teacher_grad=True, chunk_size=case.chunk, **kwargs)
    assert out.num_tokens == case.rows - case.ignored
    assert out.loss.requires_grad
    assert_same_output(out, ref)
    assert_same_grads(grads, ref_grads)
    # Ignored rows get exactly zero gradient.
    ignored_rows = inputs["labels"] == IGNORE
    assert torch.all(grads["student_hidden"][ignored_rows] == 0)
    # and the parts add up as documented
    assert out.loss.item() == pytest.approx(
        (1 - kd_rate) * float(out.ce) + kd_rate * float(out.kd), rel=1e-5, abs=1e-7
    )


def test_case_table_covers_dividing_and_non_dividing_chunks():
    divides = {(case.rows - case.ignored) % case.chunk == 0 for case in CASES.values() if case.chunk}
    assert divides == {True, False}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_divergence_params_change_the_result(name):
    """Non-default params are really passed through (the fused result follows them, not the defaults)."""
    inputs = make_inputs(24, num_ignored=4, seed=3)
    default, _ = run_fused(inputs, backward=False, divergence=name, kd_rate=1.0, chunk_size=5)
    custom, _ = run_fused(inputs, backward=False, divergence=name, kd_rate=1.0, chunk_size=5, **PARAMS[name])
    ref, _ = run_reference(inputs, backward=False, divergence=name, kd_rate=1.0, **PARAMS[name])
    assert_rel(custom.loss, ref.loss, RTOL)
    assert abs(custom.loss.item() - default.loss.item()) > 1e-4 * abs(default.loss.item())


def test_teacher_none_sft_matches_cross_entropy():
    inputs = make_inputs(30, num_ignored=7, student_bias=True, seed=5)
    inputs.update(teacher_hidden=None, teacher_weight=None, teacher_bias=None)
    out, grads = run_fused(inputs, kd_rate=0.0, chunk_size=4)
    leaves = _leaves(inputs)
    logits, _ = materialised_logits(leaves)
    ce = F.cross_entropy(logits, leaves["labels"], ignore_index=IGNORE)
    ce.backward()
    assert_rel(out.loss, ce, RTOL)
    assert_rel(out.ce, ce, RTOL)
    assert float(out.kd) == 0.0 and out.todi_weight is None
    assert_same_grads(grads, {k: leaves[k].grad for k in STUDENT})


def test_num_items_in_batch_and_grad_accumulation():
    """Two micro-batches normalised by the global count and backpropagated in turn accumulate the gradients
    of one call over all rows (and both equal the materialised reference)."""
    inputs = make_inputs(36, num_ignored=10, student_bias=True, teacher_bias=True, seed=7)
    total = int((inputs["labels"] != IGNORE).sum())
    leaves = _leaves(inputs)
    parts = []
    for rows, num_items in ((slice(0, 15), total), (slice(15, 36), torch.tensor(total))):
        micro = {
            k: v[rows] if k in ("student_hidden", "teacher_hidden", "labels") else v
            for k, v in leaves.items()
        }
        out = call_fused(micro, num_items_in_batch=num_items, chunk_size=4)
        out.loss.backward()
        parts.append(out)
    full, full_grads = run_fused(inputs, chunk_size=4)
    ref, ref_grads = run_reference(inputs)
    assert sum(p.num_tokens for p in parts) == total == full.num_tokens
    assert_rel(parts[0].loss + parts[1].loss, full.loss, RTOL)
    assert_rel(parts[0].ce + parts[1].ce, ref.ce, RTOL)
    assert_rel(parts[0].kd + parts[1].kd, ref.kd, RTOL)
    accumulated = {k: leaves[k].grad for k in STUDENT}
    assert_same_grads(accumulated, full_grads)
    assert_same_grads(accumulated, ref_grads)
    # each micro-batch against the materialised loss with the same global count
    first = {
        k: v[:15] if k in ("student_hidden", "teacher_hidden", "labels") else v for k, v in inputs.items()
    }
    ref_first, _ = run_reference(first, backward=False, num_items_in_batch=total)
    assert parts[0].num_tokens == ref_first.num_tokens < total
    assert_same_output(parts[0], ref_first)


def test_backward_scales_with_upstream_gradient():
    inputs = make_inputs(20, num_ignored=3, seed=8)
    _, grads = run_fused(inputs, chunk_size=3)
    leaves = _leaves(inputs)
    out = call_fused(leaves, chunk_size=3)
    (2.5 * out.loss).backward()
    for key in ("student_hidden", "student_weight"):
        assert_rel(leaves[key].grad, 2.5 * grads[key], RTOL, key)


@pytest.mark.parametrize("name", ["todi", "js", "fkl"])
def test_no_grad_eval(name):
    inputs = make_inputs(26, num_ignored=5, student_bias=True, seed=9)
    ref, _ = run_reference(inputs, backward=False, divergence=name)
    leaves = _leaves(inputs)
    with torch.no_grad():
        out = call_fused(leaves, divergence=name, chunk_size=4)
    assert not out.loss.requires_grad and out.loss.grad_fn is None
    assert_same_output(out, ref)
    # also with inputs that never required grad, outside no_grad
    plain = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    out2 = call_fused(plain, divergence=name, chunk_size=4)
    assert not out2.loss.requires_grad
    assert_same_output(out2, ref)


@pytest.mark.parametrize("name", ["todi", "fkl", "js"])
def test_bf16_hidden_states(name):
    inputs = make_inputs(40, h_s=32, h_t=48, vocab=64, num_ignored=8, student_bias=True, seed=10)
    bf16 = {
        k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in inputs.items()
    }
    rounded = {
        k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in bf16.items()
    }
    out, grads = run_fused(bf16, divergence=name, chunk_size=6)
    ref, ref_grads = run_reference(rounded, divergence=name)  # float32 math on the same bf16 values
    assert out.loss.dtype == torch.float32 and out.ce.dtype == torch.float32
    assert out.num_tokens == ref.num_tokens
    for attr in ("loss", "ce", "kd"):
        assert_rel(getattr(out, attr), getattr(ref, attr), 2e-2, attr)
    if name == "todi":
        assert_rel(out.todi_weight, ref.todi_weight, 5e-2, "todi_weight")
    for key, expected in ref_grads.items():
        assert grads[key].dtype == torch.bfloat16
        assert grads[key].shape == bf16[key].shape
        assert_rel(grads[key].float(), expected, 5e-2, key)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_no_supervised_position(name):
    inputs = make_inputs(12, num_ignored=12, student_bias=True, seed=11)
    ref, ref_grads = run_reference(inputs, divergence=name)
    out, grads = run_fused(inputs, divergence=name, chunk_size=4)
    assert out.num_tokens == 0
    assert out.loss.item() == 0.0 and float(out.ce) == 0.0 and float(out.kd) == 0.0
    assert out.loss.requires_grad
    assert_same_output(out, ref)
    for key, grad in grads.items():
        assert grad is not None and torch.all(grad == 0), key
        assert grad.shape == ref_grads[key].shape


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("masked", ["teacher", "both"])
def test_non_finite_bias_masks_vocabulary_items(name, masked):
    """A -inf teacher bias entry (and a -inf student one) is a masked vocabulary item: same result as the
    materialised loss on the same non-finite logits."""
    inputs = make_inputs(30, vocab=40, num_ignored=6, student_bias=True, teacher_bias=True, seed=12)
    labels = inputs["labels"]
    inputs["teacher_bias"][[3, 17]] = -math.inf
    if masked == "both":
        inputs["student_bias"][25] = -math.inf
        labels[labels == 25] = 0  # a -inf target would make CE infinite in both
    ref, ref_grads = run_reference(inputs, divergence=name, **PARAMS.get(name, {}))
    out, grads = run_fused(inputs, divergence=name, chunk_size=7, **PARAMS.get(name, {}))
    assert math.isfinite(out.loss.item())
    assert_same_output(out, ref)
    assert_same_grads(grads, ref_grads)
    if masked == "both":
        assert grads["student_weight"][25].abs().max() == 0 and grads["student_bias"][25] == 0


def test_module_wrapper_matches_function():
    inputs = make_inputs(33, num_ignored=6, student_bias=True, teacher_bias=True, seed=13)
    kwargs = dict(kd_rate=0.3, temperature=1.5, chunk_size=5, compile=False, skew=0.2)
    loss_fn = FusedLinearDistillationLoss("skl", **kwargs)
    assert isinstance(loss_fn, torch.nn.Module) and not list(loss_fn.parameters())
    assert "skl" in repr(loss_fn) and "0.3" in repr(loss_fn)
    leaves = _leaves(inputs)
    out = call_fused(leaves, loss_fn, num_items_in_batch=40)
    out.loss.backward()
    fn_out, fn_grads = run_fused(inputs, divergence="skl", num_items_in_batch=40, **kwargs)
    ref, ref_grads = run_reference(
        inputs, divergence="skl", kd_rate=0.3, temperature=1.5, skew=0.2, num_items_in_batch=40
    )
    assert_same_output(out, fn_out)
    assert_same_output(out, ref)
    assert_same_grads({k: leaves[k].grad for k in STUDENT}, fn_grads)
    assert_same_grads({k: leaves[k].grad for k in STUDENT}, ref_grads)
    # ignore_index is honoured by the module
    leaves = _leaves({**inputs, "labels": torch.where(inputs["labels"] == IGNORE, -1, inputs["labels"])})
    out = call_fused(
        leaves, FusedLinearDistillationLoss("skl", ignore_index=-1, **kwargs), num_items_in_batch=40
    )
    assert out.num_tokens == fn_out.num_tokens
    assert_rel(out.loss, fn_out.loss, RTOL)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="beta"):
        FusedLinearDistillationLoss("fkl", beta=2.0)
    with pytest.raises(ValueError, match="kd_rate"):
        FusedLinearDistillationLoss("todi", kd_rate=1.5)
    with pytest.raises(ValueError, match="unknown divergence"):
        FusedLinearDistillationLoss("nope")


def test_invalid_arguments():
    inputs = make_inputs(10, seed=14)
    a = (
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["teacher_hidden"],
        inputs["teacher_weight"],
    )
    labels = inputs["labels"]
    with pytest.raises(ValueError, match="flatten"):
        fused_linear_distillation_loss(a[0].reshape(2, 5, -1), a[1], a[2], a[3], labels.reshape(2, 5))
    with pytest.raises(ValueError, match="kd_rate"):
        fused_linear_distillation_loss(a[0], a[1], None, None, labels, kd_rate=0.5)
    with pytest.raises(ValueError, match="rows"):
        fused_linear_distillation_loss(a[0], a[1], a[2][:-1], a[3], labels)
    with pytest.raises(ValueError, match="vocabularies differ"):
        fused_linear_distillation_loss(a[0], a[1], a[2], a[3][:-1], labels)
    with pytest.raises(ValueError, match="teacher_weight"):
        fused_linear_distillation_loss(a[0], a[1], a[2], None, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_distillation_loss(a[0], a[1], a[2], a[3], labels, chunk_size=-1)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_distillation_loss(a[0], a[1], a[2], a[3], labels, temperature=0.0)
    with pytest.raises(ValueError, match="skew"):
        fused_linear_distillation_loss(a[0], a[1], a[2], a[3], labels, divergence="todi", skew=0.2)


# ----------------------------------------------------------------------------------------------------------
# closed-form gradients of the registry vs float64 autograd
# ----------------------------------------------------------------------------------------------------------


def test_closed_form_gradients_exist_for_fkl_rkl_todi():
    with_closed_form = {name for name in DIVERGENCES if get_divergence(name).value_and_grad is not None}
    assert {"fkl", "rkl", "todi"} <= with_closed_form


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    ("name", "params"),
    [("fkl", {}), ("rkl", {}), ("todi", {}), ("todi", {"beta": 2.0}), ("todi", {"beta": 0.3})]
    + [
        (n, PARAMS.get(n, {}))
        for n in DIVERGENCES
        if n not in ("fkl", "rkl", "todi") and get_divergence(n).value_and_grad is not None
    ],
)
def test_value_and_grad_matches_float64_autograd(name, params, masked):
    entry = get_divergence(name)
    g = torch.Generator().manual_seed(15)
    s = (torch.randn(7, 33, generator=g, dtype=torch.float64) * 2.0).requires_grad_()
    t = torch.randn(7, 33, generator=g, dtype=torch.float64) * 2.0
    if masked:
        t = t.clone()
        t[:, [2, 9]] = -math.inf  # masked vocabulary items
        t[4] = -math.inf  # a fully masked row
        ls, lt = masked_log_probs(s, t)
    else:
        ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    value = entry.fn(ls, lt, **entry.resolve(params))
    (grad,) = torch.autograd.grad(value.sum(), s)
    closed_value, closed_grad = entry.value_and_grad(ls.detach(), lt.detach(), **entry.resolve(params))
    assert closed_value.shape == value.shape and closed_grad.shape == s.shape
    torch.testing.assert_close(closed_value, value.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(closed_grad, grad, rtol=1e-10, atol=1e-12)
    if masked:
        assert torch.all(closed_grad[:, [2, 9]] == 0) and torch.all(closed_grad[4] == 0)
        assert torch.all(ls[:, [2, 9]] == LOG_FLOOR)


# ----------------------------------------------------------------------------------------------------------
# memory: the [N, V] logits never exist
# ----------------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


class LinearRecorder:
    """Stands in for ``torch.nn.functional`` inside todi.losses.fused, recording F.linear's output shapes."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __getattr__(self, name):
        return getattr(F, name)

    def linear(self, x, weight, bias=None):
        out = F.linear(x, weight, bias)
        self.shapes.append(tuple(out.shape))
        return out


MEM = dict(n=512, h_s=16, h_t=24, vocab=256)  # N * V = 131072 vs chunk * V = 4096 and V * H_t = 6144


def _largest_during(fn) -> LargestTensor:
    mode = LargestTensor()
    with mode:
        fn()
    return mode


def test_memory_probe_detects_materialised_logits():
    """Positive control: the probe sees the [N, V] tensors of the materialised loss (forward and backward)."""
    inputs = make_inputs(**MEM, num_ignored=0, seed=16)
    mode = _largest_during(lambda: run_reference(inputs))
    assert mode.numel >= MEM["n"] * MEM["vocab"]
    # backward alone too (the probe sees the autograd engine's ops)
    leaves = _leaves(inputs)
    student, teacher = materialised_logits(leaves)
    out = distillation_loss(student, teacher, leaves["labels"])
    mode = _largest_during(out.loss.backward)
    assert mode.numel >= MEM["n"] * MEM["vocab"]


@pytest.mark.parametrize("name", DIVERGENCES)
def test_never_materialises_n_by_v(name, monkeypatch):
    inputs = make_inputs(**MEM, num_ignored=40, student_bias=True, teacher_bias=True, seed=17)
    chunk, n, vocab = 16, MEM["n"], MEM["vocab"]
    recorder = LinearRecorder()
    monkeypatch.setattr(fused_mod, "F", recorder)
    mode = _largest_during(lambda: run_fused(inputs, divergence=name, chunk_size=chunk))
    bound = max(chunk * vocab, vocab * MEM["h_t"], n * MEM["h_t"])
    assert bound * 4 <= n * vocab
    assert mode.numel <= bound, (mode.numel, mode.op)
    # the head projections only ever see one chunk of rows, and cover each supervised row once per model
    assert recorder.shapes and all(rows <= chunk and v == vocab for rows, v in recorder.shapes)
    assert sum(rows for rows, _ in recorder.shapes) == 2 * (n - 40)


def test_no_grad_never_materialises_n_by_v():
    inputs = make_inputs(**MEM, seed=18)
    with torch.no_grad():
        mode = _largest_during(lambda: run_fused(inputs, backward=False, chunk_size=32))
    assert mode.numel <= max(32 * MEM["vocab"], MEM["vocab"] * MEM["h_t"], MEM["n"] * MEM["h_t"]), mode.op


def test_default_chunk_is_auto_chunk_size(monkeypatch):
    vocab = 1_200_000  # 128 MiB / (4 B * 1.2M) = 27 rows -> 16 (the lower clamp)
    g = torch.Generator().manual_seed(19)
    hidden, weight = torch.randn(40, 4, generator=g), torch.randn(vocab, 4, generator=g) * 0.1
    labels = torch.randint(0, vocab, (40,), generator=g)
    recorder = LinearRecorder()
    monkeypatch.setattr(fused_mod, "F", recorder)
    fused_linear_distillation_loss(hidden, weight, None, None, labels, kd_rate=0.0, compile=False)
    assert auto_chunk_size(40, vocab) == 16
    assert [rows for rows, _ in recorder.shapes] == [16, 16, 8]


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, os, threading, time
    import torch
    torch.set_num_threads(1)
    from todi.losses import distillation_loss, fused_linear_distillation_loss

    vocab, hidden, chunk = 8192, 64, 64
    g = torch.Generator().manual_seed(0)

    def inputs(rows):
        sh = torch.randn(rows, hidden, generator=g).requires_grad_()
        sw = (torch.randn(vocab, hidden, generator=g) * 0.1).requires_grad_()
        th, tw = torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.1
        return sh, sw, th, tw, torch.randint(0, vocab, (rows,), generator=g)

    def fused(sh, sw, th, tw, labels):
        out = fused_linear_distillation_loss(sh, sw, th, tw, labels, chunk_size=chunk, compile=False)
        out.loss.backward()

    def materialised(sh, sw, th, tw, labels):
        with torch.no_grad():
            teacher = th @ tw.T
        distillation_loss(sh @ sw.T, teacher, labels).loss.backward()

    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def peak_growth(fn, rows):
        # ru_maxrss is a process-lifetime high-water mark (import spikes can hide a call's peak), so a
        # sampling thread records the resident size during the call instead.
        args = inputs(rows)
        before, peak, done = rss(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.0005)

        thread = threading.Thread(target=sample)
        thread.start()
        fn(*args)
        done.set()
        thread.join()
        return max(peak[0], rss()) - before

    fused(*inputs(chunk))  # warm-up: kernels loaded, one chunk's temporaries allocated once
    growth = {"fused_512": peak_growth(fused, 512), "fused_4096": peak_growth(fused, 4096)}
    growth["materialised_1024"] = peak_growth(materialised, 1024)
    print(json.dumps(growth))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_peak_rss_independent_of_rows():
    """Measured in a fresh process: the resident-size peak of forward + backward over N = 4096 rows (V = 8192,
    chunk 64) is about that of N = 512, while the materialised loss adds several [N, V] float32 tensors
    (positive control: the measurement can see them)."""
    vocab = 8192
    # A fixed mmap threshold makes glibc return every large block to the OS when it is freed, so the peak RSS
    # tracks the live tensors rather than heap fragmentation (the dynamic threshold adds ~10 MiB of noise).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TODI_COMPILE": "0", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    assert growth["materialised_1024"] >= 1024 * vocab * 4, growth  # at least one [1024, V] tensor
    # Fused: the peak is the chunk's temporaries (~10 [64, V] tensors, measured ~35 MiB) and does not grow
    # with N: 512 -> 4096 rows adds less than 1/8 of the [3584, V] tensor a materialised loss would add
    # (measured ~3 MiB, the O(N H) buffers), and the whole N = 4096 call stays under half of one [4096, V].
    assert growth["fused_4096"] - growth["fused_512"] < (4096 - 512) * vocab * 4 / 8, growth
    assert growth["fused_4096"] < 4096 * vocab * 4 / 2, growth


# ----------------------------------------------------------------------------------------------------------
# auto_chunk_size
# ----------------------------------------------------------------------------------------------------------


def _reference_chunk(num_rows: int, vocab: int) -> int:
    size = 1
    while 2 * size * vocab * 4 <= 128 * 2**20:
        size *= 2
    size = min(max(size, 16), 4096)
    rows_pow2 = 1
    while rows_pow2 < max(num_rows, 1):
        rows_pow2 *= 2
    return min(size, rows_pow2)


def test_auto_chunk_size_documented_examples():
    assert auto_chunk_size(10**6, 50_000) == 512
    assert auto_chunk_size(10**6, 150_000) == 128
    assert auto_chunk_size(10**6, 100) == 4096  # upper clamp
    assert auto_chunk_size(10**6, 4 * 10**7) == 16  # lower clamp
    assert auto_chunk_size(100, 50_000) == 128  # rows rounded up to a power of two
    assert auto_chunk_size(100, 10) == 128
    assert auto_chunk_size(5, 4 * 10**7) == 8  # the row clamp wins over the lower clamp
    assert auto_chunk_size(1, 50_000) == 1
    assert auto_chunk_size(0, 50_000) >= 1
    # 512 rows of 50k float32 logits fit in 128 MiB, 1024 do not
    assert 512 * 50_000 * 4 <= 128 * 2**20 < 1024 * 50_000 * 4


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 100_000), st.integers(1, 20_000_000))
def test_auto_chunk_size_property(num_rows, vocab):
    size = auto_chunk_size(num_rows, vocab)
    assert size == _reference_chunk(num_rows, vocab)
    assert size >= 1 and size & (size - 1) == 0  # a power of two
    assert size <= 4096
    assert size >= max(num_rows, 1) or size >= 16 or size * vocab * 4 > 64 * 2**20


# ----------------------------------------------------------------------------------------------------------
# torch.compile path (slow: compiles the chunk kernel)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("name", "with_bias"), [("todi", True), ("fkl", False), ("js", True)])
def test_compiled_kernel_matches_materialised(name, with_bias, caplog):
    # 40 supervised rows in chunks of 12: three full chunks (compiled kernel) and a partial one (eager).
    inputs = make_inputs(46, num_ignored=6, student_bias=with_bias, teacher_bias=with_bias, seed=20)
    params = PARAMS.get(name, {})
    kwargs = dict(divergence=name, kd_rate=0.3, temperature=1.5, **params)
    ref, ref_grads = run_reference(inputs, **kwargs)
    before = set(fused_mod._COMPILED)
    with caplog.at_level(logging.WARNING, logger="todi.losses.fused"):
        out, grads = run_fused(inputs, chunk_size=12, compile=True, **kwargs)
        with torch.no_grad():
            eval_out, _ = run_fused(inputs, backward=False, chunk_size=12, compile=True, **kwargs)
    assert not [r for r in caplog.records if "torch.compile" in r.getMessage()], caplog.text
    new_keys = set(fused_mod._COMPILED) - before
    assert not fused_mod._COMPILE_FAILED & (new_keys | before)
    assert any(key[0].divergence.name == name for key in fused_mod._COMPILED), "the kernel was not compiled"
    assert_same_output(out, ref)
    assert_same_output(eval_out, ref)
    assert_same_grads(grads, ref_grads)


def test_more_kernel_variants_than_dynamos_default_limit_all_compile(monkeypatch):
    # Dynamo keeps at most 8 graphs per function by default and runs further variants of it eagerly,
    # silently; 8 divergences x (train, eval) in one process (todi demo --all) are 16 variants. The "eager"
    # backend traces with dynamo (where the limit lives) without inductor's slow code generation.
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(fused_mod.torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    monkeypatch.setattr(fused_mod, "_COMPILED", {})
    torch._dynamo.reset()
    inputs = make_inputs(30, num_ignored=2, seed=21)
    for name in DIVERGENCES:
        for grad in (True, False):
            graphs = counters["stats"]["unique_graphs"]
            with torch.set_grad_enabled(grad):
                out, _ = run_fused(inputs, backward=grad, chunk_size=8, compile=True, divergence=name)
            assert counters["stats"]["unique_graphs"] > graphs, f"{name} (grad {grad}) ran eagerly"
            ref, _ = run_reference(inputs, backward=False, divergence=name)
            assert_same_output(out, ref)
    assert len(fused_mod._COMPILED) == 2 * len(DIVERGENCES)
    torch._dynamo.reset()
