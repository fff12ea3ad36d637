"""Linear head + distillation objective fused and chunked: the [N, V] logits never exist at once.

The forward pass walks over chunks of supervised positions; for each chunk it builds the student and
teacher logits ``[chunk, V]``, computes the chunk's CE and divergence sums *and* the gradient of the
objective w.r.t. the chunk's student logits, and immediately folds that gradient into the gradients
of the student hidden states, head weight and bias. Backward then only scales the stored gradients.
Peak memory is therefore O(chunk_size x V) whatever N is (the same design as Liger-Kernel's chunked
losses), and it serves every divergence in the registry.

The pieces, in reading order: :class:`_Objective` (what the loss computes); a :class:`_Teacher` (the
teacher's rows in one of four forms: none, dense hidden states and head, a sparse teacher's top k and tail
bucket, or that bucket spread over the tail), whose ``chunk(rows)`` gives the kernel its side of a chunk;
:class:`_ChunkStep` (one call's settings; ``run`` sends a chunk through the dense or the sparse kernel,
compiled or not); and :class:`_FusedLinearDistillation`, the one loop over chunks.

Backends: ``"torch"`` runs a chunk through the tensor code below; ``"triton"`` (CUDA, dense or no teacher,
every divergence but akl) through the row kernel of :mod:`todi.losses.triton_loss`, on the logits in the
model's dtype, writing the gradient over the student's logits; ``"auto"`` takes Triton where it can.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from todi.divergences import (
    Divergence,
    check_teacher_logits,
    check_vocab,
    get_divergence,
    masked_log_probs,
    todi_weight,
)
from todi.losses.objective import LossOutput, check_objective, normaliser
from todi.losses.sparse import SparseTeacher, check_sparse_rows, dense_teacher_log_probs
from todi.losses.triton_loss import BACKENDS, resolve_backend, triton_chunk_size

logger = logging.getLogger(__name__)

__all__ = ["FusedLinearDistillationLoss", "auto_chunk_size", "fused_linear_distillation_loss"]

# Budget for ONE [chunk, V] float32 tensor; the chunk step keeps roughly ten of them alive.
_CHUNK_BYTES = 128 * 2**20


def auto_chunk_size(num_rows: int, vocab_size: int) -> int:
    """The chunk size used when none is given.

    The largest power of two whose ``[chunk, V]`` float32 tensor fits in 128 MiB (so the ~10 such
    temporaries of one chunk stay near 1.3 GiB, whatever N is), clamped to [16, 4096] and to the number
    of rows rounded up to a power of two. For V = 50k that is 512 rows; for V = 150k, 128 rows. Smaller
    chunks save memory but starve the head matmuls: on a 2-core CPU at V = 49,152, 128-row chunks ran
    the fused ToDi step 16% slower than 512-row chunks (benchmarks/loss_bench.py --chunk-size).
    """
    rows_in_budget = max(_CHUNK_BYTES // (max(vocab_size, 1) * 4), 1)
    size = min(max(1 << (rows_in_budget.bit_length() - 1), 16), 4096)
    return min(size, 1 << (max(num_rows, 1) - 1).bit_length())


def _ce_part(
    z: Tensor, targets: Tensor, scale: Tensor, kd_rate: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """CE sum of a chunk and, with need_grad, d((1 - kd_rate) CE * scale)/dz."""
    if kd_rate >= 1:
        return z.new_zeros(()), None
    lse = torch.logsumexp(z, dim=-1)
    ce = (lse - z.gather(1, targets.unsqueeze(1)).squeeze(1)).sum()
    grad = None
    if need_grad:
        # softmax - one_hot(targets), written as a where so that it fuses (and avoids an inductor
        # miscompile seen with scatter_add_ on CPU).
        softmax = torch.exp(z - lse.unsqueeze(1))
        is_target = torch.arange(z.shape[1], device=z.device) == targets.unsqueeze(1)
        grad = torch.where(is_target, softmax - 1.0, softmax) * ((1.0 - kd_rate) * scale)
    return ce, grad


@dataclass(frozen=True)
class _Objective:
    """What the loss computes: ``(1 - kd_rate) CE + kd_rate divergence`` at ``temperature``."""

    divergence: Divergence
    params: tuple[tuple[str, float | str], ...]  # the divergence's resolved parameters, sorted (hashable)
    kd_rate: float
    temperature: float


# What a teacher's chunk(rows) gives the kernel: dense logits or log-probs [c, V], a sparse teacher's
# (ids [c, k], bucket log-probs [c, k (+1)]), or None without a teacher.
_TeacherChunk = Tensor | tuple[Tensor, Tensor] | None


class _Teacher(Protocol):
    """The teacher's side of the supervised rows, in one of four forms (the classes below). It never
    receives gradients, so its tensors are held here, detached, rather than passed to the autograd Function.
    """

    form: ClassVar[str]  # tells the chunk kernel what chunk() gives it: "none", "dense", "sparse", "spread"

    def chunk(self, rows: slice, masked: bool) -> _TeacherChunk:
        """What the kernel compares the student's logits of ``rows`` with; ``masked``: some input of the
        call is non-finite."""
        ...

    def tensors_to_check(self) -> tuple[Tensor | None, ...]:
        """The tensors whose non-finite values send the call down the masked path."""
        ...


class _NoTeacher:
    """No teacher (kd_rate = 0): the kernel computes CE alone."""

    form = "none"

    def chunk(self, rows: slice, masked: bool) -> None:
        return None

    def tensors_to_check(self) -> tuple[Tensor | None, ...]:
        return ()

    def logits(self, rows: slice, masked: bool) -> None:
        return None


@dataclass(frozen=True, eq=False)
class _DenseTeacher:
    """Hidden states ``[N, H_t]`` and head (weight ``[V, H_t]``, bias ``[V]``): logits projected chunk by
    chunk, like the student's."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    form = "dense"

    def chunk(self, rows: slice, masked: bool) -> Tensor:
        return self.logits(rows, masked).float()

    def logits(self, rows: slice, masked: bool) -> Tensor:
        """The rows' logits in the head's dtype (the Triton backend reads them as they are)."""
        logits = F.linear(self.hidden[rows], self.weight, self.bias)
        if masked:  # finite inputs cannot give NaN logits; only the masked path needs the check
            check_teacher_logits(logits)
        return logits

    def tensors_to_check(self) -> tuple[Tensor | None, ...]:
        return self.hidden, self.weight, self.bias


@dataclass(frozen=True, eq=False)
class _SparseRows:
    """A sparse teacher (a cache's rows, tail_mode="bucket"): its top-k ``ids`` ``[N, k]`` and ``bucket``,
    its log-probs at T over them and (when k < V) the tail, ``[N, k (+1)]``; the divergence runs on those
    k + 1 outcomes."""

    ids: Tensor
    bucket: Tensor
    form = "sparse"

    def chunk(self, rows: slice, masked: bool) -> tuple[Tensor, Tensor]:
        return self.ids[rows], self.bucket[rows]

    def tensors_to_check(self) -> tuple[Tensor | None, ...]:
        return ()  # the sparse kernel always takes the masked path


@dataclass(frozen=True, eq=False)
class _SpreadTail:
    """A sparse teacher whose tail bucket's mass is spread over the ``V - k`` tail tokens, evenly or by the
    cache's tail ``samples`` ``[N, m]`` (tail_mode "uniform" / "sampled"): dense teacher rows, given to the
    kernel as log-probs at T already (no second division and log-softmax over ``[chunk, V]``)."""

    ids: Tensor
    bucket: Tensor
    vocab_size: int
    samples: Tensor | None
    form = "spread"

    def chunk(self, rows: slice, masked: bool) -> Tensor:
        samples = None if self.samples is None else self.samples[rows]
        return dense_teacher_log_probs(self.ids[rows], self.bucket[rows], self.vocab_size, samples)

    def tensors_to_check(self) -> tuple[Tensor | None, ...]:
        return (self.bucket,)  # -inf where the teacher's tail underflowed: the masked path


def _sparse_teacher_rows(teacher: SparseTeacher, temperature: float) -> _SparseRows | _SpreadTail:
    ids, bucket, spread, samples = teacher.kernel_inputs(temperature)
    return _SpreadTail(ids, bucket, teacher.vocab_size, samples) if spread else _SparseRows(ids, bucket)


_COMPILED: dict[tuple, Any] = {}
_COMPILE_FAILED: set[tuple] = set()


@dataclass(frozen=True)
class _ChunkStep:
    """What the kernel does to every chunk of one call: the objective against a teacher of this form, with
    two switches the call's inputs decide. Hashable: with the chunk's shapes it keys the compiled kernels."""

    objective: _Objective
    teacher: str  # the teacher's form (_Teacher.form)
    need_grad: bool  # the caller wants gradients: also d(objective * scale)/dz for the student's
    masked: bool  # some input is non-finite: the masked log-softmax (the sparse kernel always masks)
    backend: str = "torch"  # "triton": run_triton instead of run (dense or no teacher)

    def run(
        self, z: Tensor, teacher: _TeacherChunk, targets: Tensor, scale: Tensor, compiled: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """One chunk of float32 student logits ``z`` against the teacher's chunk of the same rows;
        ``compiled``: through ``torch.compile`` (one compiled kernel per key), eagerly where that fails."""
        kernel = _sparse_chunk_kernel if self.teacher == "sparse" else _chunk_kernel
        key = (  # of the kernel's compiled copy
            self.objective,
            self.need_grad,
            self.masked,
            tuple(z.shape),
            z.device.type,
            kernel.__name__,
            # a sparse teacher's k is a shape of its own graph: counted so the recompile limit has room
            teacher[0].shape[-1] if self.teacher == "sparse" else None,
            self.teacher,
        )
        if compiled and key not in _COMPILE_FAILED:
            compiled_kernel = _COMPILED.get(key)
            if compiled_kernel is None:
                compiled_kernel = _COMPILED[key] = torch.compile(kernel, dynamic=False)
            try:
                with _recompile_limit(len(_COMPILED)):
                    return compiled_kernel(z, teacher, targets, scale, self)
            except Exception as err:  # a backend without a compiler must not stop training
                _COMPILE_FAILED.add(key)
                logger.warning("torch.compile of the fused loss failed (%s); running it eagerly", err)
        return kernel(z, teacher, targets, scale, self)

    def run_triton(
        self, z: Tensor, teacher: Tensor | None, targets: Tensor, scale: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """:meth:`run` through the Triton row kernel, on logits ``z`` in the head's dtype; the gradient is
        written over ``z`` (and returned as it)."""
        from todi.losses.triton_loss import run_chunk

        objective = self.objective
        ce, kd, fkl_share = run_chunk(
            z,
            teacher,
            targets,
            scale,
            objective.divergence.name,
            dict(objective.params),
            objective.kd_rate,
            objective.temperature,
            self.need_grad,
        )
        ce_sum = ce.sum() if objective.kd_rate < 1 else ce.new_zeros(())  # as _ce_part
        with_share = teacher is not None and objective.divergence.name == "todi"
        return (
            ce_sum,
            kd.sum(),
            fkl_share.sum() if with_share else kd.new_zeros(()),
            z if self.need_grad else None,
        )


def _chunk_kernel(
    z: Tensor, teacher: Tensor | None, targets: Tensor, scale: Tensor, step: _ChunkStep
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """CE sum, divergence sum, ToDi's FKL-share sum and d(objective * scale)/dz for one chunk of float32
    logits, against dense teacher rows (logits, or a spread tail's log-probs at T) or, with None, CE only.

    Pure tensor code without data-dependent Python branches, so that ``torch.compile`` can fuse it into a
    few loops.
    """
    objective, need_grad = step.objective, step.need_grad
    kd_rate, temperature, divergence = objective.kd_rate, objective.temperature, objective.divergence
    params = dict(objective.params)
    ce, grad = _ce_part(z, targets, scale, kd_rate, need_grad)
    kd = fkl_share = z.new_zeros(())
    if teacher is None:
        return ce, kd, fkl_share, grad
    tempered = step.teacher == "spread"  # the rows are log-probs at T already

    def scaled_log_probs(student: Tensor) -> tuple[Tensor, Tensor]:
        s = student / temperature
        t = teacher if tempered else teacher / temperature
        if step.masked:
            return masked_log_probs(s, t)
        return F.log_softmax(s, -1), t if tempered else F.log_softmax(t, -1)

    if need_grad and divergence.value_and_grad is not None:
        ls, lt = scaled_log_probs(z)
        per_row, grad_s = divergence.value_and_grad(ls, lt, **params)
        kd = per_row.sum()
        grad_kd = grad_s * (kd_rate * scale / temperature)
    elif need_grad:

        def kd_of(student: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            ls_, lt_ = scaled_log_probs(student)
            return divergence.fn(ls_, lt_, **params).sum(), (ls_.detach(), lt_.detach())

        grad_raw, (kd, (ls, lt)) = torch.func.grad_and_value(kd_of, has_aux=True)(z)
        grad_kd = grad_raw * (kd_rate * scale)
    else:
        ls, lt = scaled_log_probs(z)
        kd, grad_kd = divergence.fn(ls, lt, **params).sum(), None
    if divergence.name == "todi":
        fkl_share = todi_weight(ls, lt, params["beta"], params["weight"]).sum()
    if grad_kd is not None:
        grad = grad_kd if grad is None else grad + grad_kd
    return ce, kd.detach(), fkl_share, grad


def _sparse_chunk_kernel(
    z: Tensor, teacher: tuple[Tensor, Tensor], targets: Tensor, scale: Tensor, step: _ChunkStep
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`_chunk_kernel` against a sparse teacher: ``teacher`` is its top-k ``ids`` ``[c, k]`` and the
    ``bucket`` log-probs at T over them and the tail, ``[c, k (+1)]``.

    The divergence lives on k + 1 bucket log-probs b; autograd runs only on that small ``[c, k + 1]``
    function, and the chain rule to the ``[c, V]`` logits is written out (cheaper than autograd through
    the gather, scatter and two log-sum-exps): with s = z / T, q = softmax(s), g = dD/db and G = sum g,
    dD/ds = g_tail * softmax over the tail of s (0 on the k ids) - G q, plus g_j at id j.
    """
    ids, bucket = teacher
    objective, need_grad = step.objective, step.need_grad
    kd_rate, temperature, divergence = objective.kd_rate, objective.temperature, objective.divergence
    params = dict(objective.params)
    ce, grad = _ce_part(z, targets, scale, kd_rate, need_grad)
    with_tail = bucket.shape[-1] > ids.shape[-1]
    s = z / temperature
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    columns = [s.gather(-1, ids) - lse]
    if with_tail:
        rest = s.scatter(-1, ids, -math.inf)
        lse_rest = torch.logsumexp(rest, dim=-1, keepdim=True)
        columns.append(lse_rest - lse)
    student_bucket = torch.cat(columns, dim=-1)

    def kd_of(b: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        ls_, lt_ = masked_log_probs(b, bucket)
        return divergence.fn(ls_, lt_, **params).sum(), (ls_.detach(), lt_.detach())

    if need_grad:
        g, (kd, (ls, lt)) = torch.func.grad_and_value(kd_of, has_aux=True)(student_bucket)
        grad_s = -g.sum(-1, keepdim=True) * torch.exp(s - lse)
        if with_tail:
            # A row whose tail underflowed has g_tail = 0 (masked); keep its exp finite.
            finite_rest = torch.where(torch.isfinite(lse_rest), lse_rest, torch.zeros_like(lse_rest))
            grad_s = grad_s + g[:, -1:] * torch.exp(rest - finite_rest)
        grad_s = grad_s.scatter_add(-1, ids, g[:, : ids.shape[-1]])
        grad_kd = grad_s * (kd_rate * scale / temperature)
        grad = grad_kd if grad is None else grad + grad_kd
    else:
        kd, (ls, lt) = kd_of(student_bucket)
    fkl_share = z.new_zeros(())
    if divergence.name == "todi":
        fkl_share = todi_weight(ls, lt, params["beta"], params["weight"]).sum()
    return ce, kd.detach(), fkl_share, grad


def _use_compile(compile: bool | None, full_chunks: int) -> bool:
    env = os.environ.get("TODI_COMPILE")
    if env is not None:
        return env not in ("0", "false", "False", "")
    if compile is not None:
        return compile
    # Compiling costs seconds once per chunk shape; only worth it when several full chunks follow.
    return full_chunks >= 4


def _recompile_limit(variants: int) -> Any:
    """Room for every kernel variant compiled so far. Each objective, grad mode and chunk shape is its own
    graph of the same function, and past dynamo's per-function limit (8 by default) it would silently run
    the newest ones eagerly: after 8 objectives in one process, say (``todi demo --all``)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), variants)})


def _all_finite(*tensors: Tensor | None) -> bool:
    """Finite inputs give finite logits, so the chunks can skip the masked log-softmax; checking the
    [N, H] inputs is far cheaper than checking [N, V] logits. A sum is non-finite whenever an element is
    (and, if it overflows, only sends a finite input down the masked path too): one pass with no
    temporaries, where isfinite().all() makes three over the [V, H] head."""
    return all(t is None or bool(torch.isfinite(t.sum(dtype=_accumulator(t)))) for t in tensors)


def _accumulator(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


_MIXED_ADDMM_FAILED: set[str] = set()  # device types whose addmm has no float32 output for bf16 operands


def _add_weight_grad(grad_weight: Tensor, grad: Tensor, h: Tensor) -> None:
    """grad_weight (float32) += grad.T @ h. A float32 grad (the torch backend) multiplies float32 operands;
    a bf16 / fp16 grad (the Triton backend) multiplies in its own dtype and accumulates straight into the
    float32 sum where the device's addmm can (else the chunk's product is rounded first, as Liger does)."""
    if grad.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad.t(), h.to(grad.dtype))
        return
    h = h.to(grad.dtype)
    if grad.device.type not in _MIXED_ADDMM_FAILED:
        try:
            torch.addmm(grad_weight, grad.t(), h, out_dtype=grad_weight.dtype, out=grad_weight)
            return
        except (RuntimeError, TypeError, NotImplementedError) as err:
            _MIXED_ADDMM_FAILED.add(grad.device.type)
            logger.info("addmm with a float32 output failed (%s); rounding each chunk's dW first", err)
    grad_weight.add_(grad.t() @ h)


class _FusedLinearDistillation(torch.autograd.Function):
    """The loss over chunks of rows, the student's gradients computed in forward (backward scales them).

    Its tensor inputs are the student's, which take gradients, and the targets; the teacher travels as one
    detached :class:`_Teacher`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher: _Teacher,
        targets: Tensor,
        denom: Tensor,
        objective: _Objective,
        chunk_size: int,
        compile: bool | None,
        grad_enabled: bool,
        backend: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Inside forward grad mode is always off; whether the caller had it on arrives as grad_enabled.
        need_grad = grad_enabled and any(ctx.needs_input_grad[:3])
        grad_hidden = torch.zeros_like(student_hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros_like(student_weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        )
        grad_bias = (
            torch.zeros_like(student_bias, dtype=torch.float32)
            if student_bias is not None and ctx.needs_input_grad[2]
            else None
        )
        scale = 1.0 / denom
        compiled = _use_compile(compile, student_hidden.shape[0] // chunk_size)
        masked = not _all_finite(student_hidden, student_weight, student_bias, *teacher.tensors_to_check())
        step = _ChunkStep(objective, teacher.form, need_grad, masked, backend)
        ce_sum = student_hidden.new_zeros((), dtype=torch.float32)
        kd_sum, fkl_share_sum = ce_sum.clone(), ce_sum.clone()
        for start in range(0, student_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = student_hidden[rows]
            student_logits = F.linear(h, student_weight, student_bias)
            if backend == "triton":  # a dense teacher or none (resolve_backend)
                teacher_logits = teacher.logits(rows, masked)  # type: ignore[attr-defined]
                ce, kd, fkl_share, grad = step.run_triton(
                    student_logits, teacher_logits, targets[rows], scale
                )
                del teacher_logits  # read: one [chunk, V] block fewer during the products below
            else:
                teacher_chunk = teacher.chunk(rows, masked)
                full = student_logits.shape[0] == chunk_size
                ce, kd, fkl_share, grad = step.run(
                    student_logits.float(), teacher_chunk, targets[rows], scale, compiled and full
                )
            ce_sum += ce
            kd_sum += kd
            fkl_share_sum += fkl_share
            if grad is None:
                continue
            if grad_hidden is not None:
                grad_hidden[rows] = grad.to(student_weight.dtype) @ student_weight
            if grad_weight is not None:
                _add_weight_grad(grad_weight, grad, h)
            if grad_bias is not None:
                grad_bias += grad.sum(0, dtype=torch.float32)
            if backend == "triton":  # the block goes before the next chunk's are built (a CUDA peak less)
                del grad, student_logits
        loss = ((1.0 - objective.kd_rate) * ce_sum + objective.kd_rate * kd_sum) / denom
        ctx.save_for_backward(
            grad_hidden,
            None if grad_weight is None else grad_weight.to(student_weight.dtype),
            None if grad_bias is None else grad_bias.to(student_bias.dtype),
        )
        ctx.mark_non_differentiable(ce_sum, kd_sum, fkl_share_sum)
        return loss, ce_sum, kd_sum, fkl_share_sum

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        grads = [g if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        # One gradient per input of forward: the student's three, then None for the rest.
        return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    labels: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    divergence: str = "todi",
    kd_rate: float = 0.5,
    temperature: float = 2.0,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    chunk_size: int | None = None,
    compile: bool | None = None,
    sparse_teacher: SparseTeacher | None = None,
    backend: str = "auto",
    **params: float | str,
) -> LossOutput:
    """Same result as :func:`todi.losses.distillation_loss` on ``hidden @ weight.T (+ bias)`` logits,
    without materialising the ``[N, V]`` logits of either model.

    Args:
        student_hidden: ``[N, H_s]`` final hidden states of the student (flattened positions).
        student_weight: ``[V, H_s]`` student output embedding; ``student_bias`` ``[V]`` optional.
        teacher_hidden, teacher_weight, teacher_bias: the same for the teacher (``[N, H_t]``,
            ``[V, H_t]``); never receive gradients. May be None when ``kd_rate == 0``.
        labels: ``[N]`` targets aligned with the rows (already shifted); ``ignore_index`` rows are
            skipped entirely.
        chunk_size: rows per chunk; None picks :func:`auto_chunk_size` (128 MiB per [chunk, V] tensor).
        compile: fuse the per-chunk softmax / divergence / gradient math with ``torch.compile``
            (several times faster on CPU and GPU). None = automatic: on when at least 4 full chunks
            are processed (compiling costs seconds once per shape); env ``TODI_COMPILE=0/1`` overrides.
            Falls back to eager with a warning where compilation fails.
        sparse_teacher: instead of ``teacher_hidden`` / ``teacher_weight``, the teacher's stored top-k
            distributions, one row per supervised position (see :mod:`todi.losses.sparse`); the result
            is :func:`todi.losses.sparse_distillation_loss` on the same logits.
        backend: ``"triton"``: the chunk math in one Triton row kernel on the logits in the head's dtype
            (CUDA; CE alone or with a dense teacher and any divergence but akl); ``"torch"``: tensor code on
            float32 copies (any case, any device; ``compile`` applies to it); ``"auto"`` (default): Triton
            on CUDA where it is importable and serves the case, else torch. See
            :mod:`todi.losses.triton_loss`.
        Other arguments as in :func:`todi.losses.distillation_loss`.

    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``. Hidden states may be
    bf16; the softmax and divergence math always runs in float32.
    """
    check_objective(kd_rate, temperature)
    registered = get_divergence(divergence)
    resolved = registered.resolve(params)
    if student_hidden.dim() != 2 or labels.shape != student_hidden.shape[:1]:
        raise ValueError(
            f"student_hidden must be [N, H] with labels [N]; got {tuple(student_hidden.shape)} and "
            f"{tuple(labels.shape)} (flatten batch and sequence first, e.g. hidden.reshape(-1, H))"
        )
    if sparse_teacher is not None and teacher_hidden is not None:
        raise ValueError("pass the teacher as teacher_hidden / teacher_weight or as sparse_teacher, not both")
    with_teacher = teacher_hidden is not None or sparse_teacher is not None
    if not with_teacher and kd_rate > 0:
        raise ValueError("teacher_hidden is None but kd_rate > 0; pass the teacher or set kd_rate=0")
    if teacher_hidden is not None:
        if teacher_weight is None:
            raise ValueError("teacher_hidden is given but teacher_weight is None")
        if teacher_hidden.shape[0] != student_hidden.shape[0]:
            raise ValueError(
                f"teacher_hidden has {teacher_hidden.shape[0]} rows but student_hidden has "
                f"{student_hidden.shape[0]}; both must hold the same positions"
            )
        check_vocab(torch.Size([student_weight.shape[0]]), torch.Size([teacher_weight.shape[0]]))

    keep = labels != ignore_index
    num_tokens = keep.sum()
    denom = normaliser(num_tokens, num_items_in_batch)
    # Only supervised rows are projected at all; the others have zero loss and zero gradient.
    rows = keep.nonzero().squeeze(-1)
    # The one place that tells the teacher's kind from the arguments.
    if teacher_hidden is not None:
        teacher: _Teacher = _DenseTeacher(
            teacher_hidden.detach().index_select(0, rows),
            teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(),
        )
    elif sparse_teacher is not None:
        check_sparse_rows(sparse_teacher, rows.numel(), student_weight.shape[0])
        teacher = _sparse_teacher_rows(sparse_teacher, temperature)
    else:
        teacher = _NoTeacher()
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}")
    # The kernel implements ToDi's sigmoid weight only; the ablation rules (--todi-weight) stay on torch.
    kernel_case = (
        registered.name
        if resolved.get("weight", "sigmoid") == "sigmoid"
        else f"{registered.name} weight={resolved['weight']}"
    )
    backend = resolve_backend(backend, student_hidden.device, kernel_case, teacher.form)
    if chunk_size:
        chunk = chunk_size
    elif backend == "triton":
        itemsize = student_hidden.element_size()
        chunk = triton_chunk_size(rows.numel(), student_weight.shape[0], itemsize, teacher.form == "dense")
    else:
        chunk = auto_chunk_size(rows.numel(), student_weight.shape[0])
    objective = _Objective(registered, tuple(sorted(resolved.items())), float(kd_rate), float(temperature))
    loss, ce_sum, kd_sum, fkl_share_sum = _FusedLinearDistillation.apply(
        student_hidden.index_select(0, rows),
        student_weight,
        student_bias,
        teacher,
        labels.index_select(0, rows),
        denom,
        objective,
        chunk,
        compile,
        torch.is_grad_enabled(),
        backend,
    )
    with_todi_weight = registered.name == "todi" and with_teacher
    return LossOutput(
        loss=loss,
        ce=ce_sum / denom,
        kd=kd_sum / denom,
        num_tokens=int(num_tokens),
        todi_weight=fkl_share_sum / num_tokens.clamp_min(1) if with_todi_weight else None,
    )


class FusedLinearDistillationLoss(nn.Module):
    """Module form of :func:`fused_linear_distillation_loss` for a user's own training loop::

    loss_fn = FusedLinearDistillationLoss(divergence="todi", kd_rate=0.5, temperature=2.0)
    out = loss_fn(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight, labels)
    out.loss.backward()
    """

    def __init__(
        self,
        divergence: str = "todi",
        *,
        kd_rate: float = 0.5,
        temperature: float = 2.0,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        compile: bool | None = None,
        backend: str = "auto",
        **params: float | str,
    ) -> None:
        super().__init__()
        check_objective(kd_rate, temperature)
        get_divergence(divergence).resolve(params)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.divergence, self.kd_rate, self.temperature = divergence, kd_rate, temperature
        self.ignore_index, self.chunk_size, self.params = ignore_index, chunk_size, params
        self.compile, self.backend = compile, backend

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor | None,
        teacher_weight: Tensor | None,
        labels: Tensor,
        *,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> LossOutput:
        return fused_linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            divergence=self.divergence,
            kd_rate=self.kd_rate,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            num_items_in_batch=num_items_in_batch,
            chunk_size=self.chunk_size,
            compile=self.compile,
            backend=self.backend,
            **self.params,
        )

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, kd_rate={self.kd_rate}, temperature={self.temperature}"
