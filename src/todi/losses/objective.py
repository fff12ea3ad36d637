"""The distillation objective on materialised logits: (1 - kd_rate) CE + kd_rate KD."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from todi.divergences import check_vocab, get_divergence, log_probs, todi_weight
from todi.losses.sparse import SparseTeacher, sparse_log_probs

__all__ = ["LossOutput", "check_objective", "distillation_loss", "normaliser", "sparse_distillation_loss"]


@dataclass
class LossOutput:
    """A scalar loss and its detached parts, all normalised alike so that they add up over a step.

    ``loss``, ``ce`` and ``kd`` are this call's *sums* over its supervised tokens divided by the
    normaliser: ``num_items_in_batch`` when it was given, else this call's ``num_tokens``. So
    ``loss == (1 - kd_rate) * ce + kd_rate * kd`` always holds, and:

    - Without ``num_items_in_batch`` each field is this call's mean per supervised token.
    - With ``num_items_in_batch`` = the supervised tokens of the whole step (every micro-batch of
      gradient accumulation, on every rank), each field is this call's *share* of the step's value:
      the step's loss / CE / KD per token is the **sum** of the fields over the step's micro-batches
      (:meth:`total` does it) and, under data parallelism, over the ranks (an all-reduce with SUM).
      One micro-batch of two shows about half the step's CE; that is the share, not a bug.
    - Under DDP (which *averages* gradients over ranks) backpropagate ``loss * world_size`` so that the
      update is the gradient of the step's loss, as on one process. :class:`todi.integrations.TodiTrainer`
      and ``todi distill`` do this; a hand-written loop must.

    ``todi_weight`` is ToDi's mean FKL share over *this call's* supervised tokens (None for other
    divergences): 1 = pure FKL, 0 = pure RKL (see :func:`todi.divergences.todi_weight`). It is a mean,
    not a share: combine calls by weighting with ``num_tokens`` (:meth:`total` does it).
    """

    loss: Tensor
    ce: Tensor
    kd: Tensor
    num_tokens: int
    todi_weight: Tensor | None = None

    def metrics(self) -> dict[str, float]:
        out = {"loss": float(self.loss.detach()), "ce": float(self.ce), "kd": float(self.kd)}
        out["num_tokens"] = float(self.num_tokens)
        if self.todi_weight is not None:
            out["todi_weight"] = float(self.todi_weight)
        return out

    @staticmethod
    def total(outputs: Sequence[LossOutput]) -> LossOutput:
        """The step's values from the outputs of its micro-batches (all called with the step's
        ``num_items_in_batch``): ``loss``, ``ce``, ``kd`` and ``num_tokens`` summed, ``todi_weight``
        averaged over the tokens. ``loss`` keeps its graph. Under DDP, sum the result's fields over the
        ranks as well (``todi_weight`` weighted by ``num_tokens``)."""
        if not outputs:
            raise ValueError("LossOutput.total needs at least one output")
        num_tokens = sum(out.num_tokens for out in outputs)
        weighted = [out for out in outputs if out.todi_weight is not None]
        todi = None
        if weighted:
            todi = sum(out.todi_weight.detach() * out.num_tokens for out in weighted) / max(
                sum(out.num_tokens for out in weighted), 1
            )
        loss = outputs[0].loss
        for out in outputs[1:]:
            loss = loss + out.loss
        return LossOutput(
            loss=loss,
            ce=sum(out.ce.detach() for out in outputs),
            kd=sum(out.kd.detach() for out in outputs),
            num_tokens=num_tokens,
            todi_weight=todi,
        )


def check_objective(kd_rate: float, temperature: float) -> None:
    if not 0.0 <= kd_rate <= 1.0:
        raise ValueError(f"kd_rate must lie in [0, 1], got {kd_rate}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def normaliser(num_tokens: Tensor, num_items_in_batch: int | Tensor | None) -> Tensor:
    """The divisor of the summed losses: the global supervised-token count when given, else this call's
    count; never 0, so a call without supervised tokens returns 0 rather than nan."""
    if num_items_in_batch is None:
        return num_tokens.clamp_min(1).to(torch.float32)
    denom = torch.as_tensor(num_items_in_batch, device=num_tokens.device, dtype=torch.float32)
    return denom.clamp_min(1)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | SparseTeacher | None,
    labels: Tensor,
    *,
    divergence: str = "todi",
    kd_rate: float = 0.5,
    temperature: float = 2.0,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    **params: float | str,
) -> LossOutput:
    """``(1 - kd_rate) * CE + kd_rate * KD`` over the supervised positions.

    Args:
        student_logits: ``[..., V]`` student logits, aligned with ``labels`` (already shifted).
        teacher_logits: ``[..., V]`` teacher logits; may be None when ``kd_rate == 0`` (plain SFT); or
            a :class:`todi.losses.SparseTeacher` holding one row per supervised position (a teacher cache).
        labels: ``[...]`` target ids; positions equal to ``ignore_index`` contribute nothing.
        divergence: a name from :data:`todi.divergences.DIVERGENCES`.
        kd_rate: weight of the divergence; CE is taken at temperature 1.
        temperature: divides both logit sets inside the divergence (no T^2 factor).
        num_items_in_batch: supervised tokens of the whole global batch (all micro-batches and ranks);
            both sums are divided by it, so the returned fields are this call's share of the step (see
            :class:`LossOutput`; under DDP backpropagate ``loss * world_size``). Defaults to this call's count.
        params: the divergence's parameters, e.g. ``beta`` for todi.

    Returns:
        :class:`LossOutput`; with no supervised position the loss is 0 with zero gradients.
    """
    check_objective(kd_rate, temperature)
    registered = get_divergence(divergence)
    resolved = registered.resolve(params)
    if teacher_logits is None and kd_rate > 0:
        raise ValueError("teacher_logits is None but kd_rate > 0; pass teacher logits or set kd_rate=0")
    sparse = isinstance(teacher_logits, SparseTeacher)
    if teacher_logits is not None and not sparse:
        check_vocab(student_logits.shape, teacher_logits.shape)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but logits have shape {tuple(student_logits.shape)}; "
            "labels must have the logits' shape without the vocabulary dimension"
        )
    vocab = student_logits.shape[-1]
    keep = (labels != ignore_index).reshape(-1)
    num_tokens = keep.sum()
    denom = normaliser(num_tokens, num_items_in_batch)
    # Only supervised rows are computed: prompts are often most of a sequence.
    student = student_logits.reshape(-1, vocab)[keep]
    targets = labels.reshape(-1)[keep]

    math_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    zero = student_logits.new_zeros((), dtype=math_dtype)
    ce_sum = F.cross_entropy(student.to(math_dtype), targets, reduction="sum") if kd_rate < 1 else zero
    kd_sum, fkl_share = zero, None
    if teacher_logits is not None:
        if sparse:
            ls, lt = sparse_log_probs(student, teacher_logits, temperature)
        else:
            ls, lt = log_probs(student, teacher_logits.reshape(-1, vocab)[keep], temperature)
        per_position = registered.fn(ls, lt, **resolved)
        kd_sum = per_position.sum()
        if divergence == "todi":
            share = todi_weight(ls, lt, resolved["beta"], resolved["weight"])
            fkl_share = share.sum() / num_tokens.clamp_min(1)
    loss = ((1.0 - kd_rate) * ce_sum + kd_rate * kd_sum) / denom
    return LossOutput(
        loss=loss,
        ce=(ce_sum / denom).detach(),
        kd=(kd_sum / denom).detach(),
        num_tokens=int(num_tokens),
        todi_weight=fkl_share,
    )


def sparse_distillation_loss(
    student_logits: Tensor,
    teacher: SparseTeacher | None,
    labels: Tensor,
    **options: Any,
) -> LossOutput:
    """:func:`todi.losses.distillation_loss` with a sparse teacher (the same options): ``teacher`` holds
    one row per supervised position of ``labels`` (in flattened order); the student's logits are full
    ``[..., V]``."""
    return distillation_loss(student_logits, teacher, labels, **options)
