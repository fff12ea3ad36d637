"""Distillation from a sparse teacher: its top-k tokens plus one tail bucket, as a teacher cache stores it.

A stored teacher distribution (at temperature 1) is, per position, the log-probabilities of its k most
likely tokens and the log of the mass left over (the *tail*). Every divergence is then evaluated on
k + 1 outcomes: the k stored tokens, and one bucket holding everything else, for both models. The
student's bucket mass is ``1 - sum of its probabilities on the k ids`` (computed as a log-sum-exp over
the other logits, so it stays exact when that mass is tiny). For ToDi the weight ``a`` of the bucket
comes from the two bucket masses.

Temperature. The k stored log-probabilities are exact at any temperature T after renormalisation. The
bucket's mass at T is ``sum over tail tokens of p_v ** (1 / T)`` (normalised), which the tail's total
mass alone does not determine, so a cache stores that power sum for the temperatures named when it was
built (``todi cache-teacher --temperatures``; the paper's 2.0 by default). At any other T the tail is
taken as spread evenly over its ``V - k`` tokens, which overestimates the bucket for T > 1 (the even
spread maximises the power sum); a warning says so.

What the approximation loses: differences *inside* the tail, which matter at T = 2, where tempering
moves much of the teacher's mass into the tail (docs/performance.md measures the cost). With
``tail_mode="uniform"`` the tail mass is instead spread evenly over the ``V - k`` other tokens and the
divergence runs on all V tokens (the dense kernel), so the student's tail gets a gradient. With k = V
there is no tail and either mode equals the online loss exactly (tested).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from todi.divergences import masked_log_probs
from todi.losses.objective import LossOutput, distillation_loss

logger = logging.getLogger(__name__)

__all__ = [
    "TAIL_MODES",
    "SparseTeacher",
    "sparse_distillation_loss",
    "sparse_log_probs",
    "spread_bucket",
    "student_bucket_log_probs",
]

TAIL_MODES = ("bucket", "uniform")

_warned_temperatures: set[float] = set()


@dataclass
class SparseTeacher:
    """Teacher next-token distributions for N positions: top-k ids and log-probs (temperature 1) + tail.

    Rows are the supervised positions of a batch in order (example by example, left to right), exactly
    the rows the loss keeps from the flattened, shifted labels.
    """

    ids: Tensor  # [N, k] int64 token ids
    logprobs: Tensor  # [N, k] float32 log p_v at temperature 1
    tail: Tensor  # [N] float32 log(1 - sum_k p_v); -inf when nothing is left
    vocab_size: int
    tempered_tails: dict[float, Tensor] = field(default_factory=dict)  # T -> [N] log sum_tail p_v^(1/T)
    # "bucket": divergences on k + 1 outcomes; "uniform": on all V tokens, the teacher's tail mass (at the
    # distillation temperature) spread evenly over the tokens outside its top k.
    tail_mode: str = "bucket"

    def __post_init__(self) -> None:
        if (
            self.ids.dim() != 2
            or self.logprobs.shape != self.ids.shape
            or self.tail.shape != self.ids.shape[:1]
        ):
            raise ValueError(
                f"sparse teacher needs ids [N, k], logprobs [N, k] and tail [N]; got {tuple(self.ids.shape)}, "
                f"{tuple(self.logprobs.shape)} and {tuple(self.tail.shape)}"
            )
        if self.k > self.vocab_size:
            raise ValueError(f"k = {self.k} stored tokens exceed the vocabulary of {self.vocab_size}")
        if self.tail_mode not in TAIL_MODES:
            raise ValueError(f"tail_mode must be one of {', '.join(TAIL_MODES)}, got {self.tail_mode!r}")

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperatures: tuple[float, ...] = (2.0,)) -> SparseTeacher:
        """Keep the top ``k`` of each row of ``[N, V]`` teacher logits (temperature 1) and the tail
        statistics for ``temperatures``. Ties at the k-th place are broken by ``torch.topk``."""
        logits = logits.float()
        vocab = logits.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"k must be in [1, {vocab}], got {k}")
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        values, ids = logits.topk(k, dim=-1)
        # The tail from the logits left out, not log(1 - sum p): exact even when the tail mass is tiny.
        rest = logits.scatter(-1, ids, -math.inf) - lse
        tail = torch.logsumexp(rest, dim=-1)
        tempered = {float(t): torch.logsumexp(rest / t, dim=-1) for t in temperatures if t != 1.0}
        return cls(ids, values - lse, tail, vocab, tempered)

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    @property
    def has_tail(self) -> bool:
        return self.k < self.vocab_size

    def __len__(self) -> int:
        return self.ids.shape[0]

    def apply(self, fn: Callable[[Tensor], Tensor]) -> SparseTeacher:
        """The same rows with ``fn`` applied to every per-row tensor."""
        tails = {t: fn(v) for t, v in self.tempered_tails.items()}
        return SparseTeacher(
            fn(self.ids), fn(self.logprobs), fn(self.tail), self.vocab_size, tails, self.tail_mode
        )

    def to(self, device: torch.device | str) -> SparseTeacher:
        return self.apply(lambda t: t.to(device))

    def slice(self, start: int, end: int) -> SparseTeacher:
        """Rows ``start`` to ``end`` (exclusive)."""
        return self.apply(lambda t: t[start:end])

    @classmethod
    def cat(cls, parts: list[SparseTeacher]) -> SparseTeacher:
        """The rows of ``parts`` one after the other (same vocabulary, temperatures and tail mode)."""
        first = parts[0]
        return cls(
            torch.cat([p.ids for p in parts]),
            torch.cat([p.logprobs for p in parts]),
            torch.cat([p.tail for p in parts]),
            first.vocab_size,
            {t: torch.cat([p.tempered_tails[t] for p in parts]) for t in first.tempered_tails},
            first.tail_mode,
        )

    def tail_at(self, temperature: float) -> Tensor:
        """``log sum_{v in tail} p_v ** (1 / T)`` per row (unnormalised bucket weight at temperature T)."""
        if temperature == 1.0:
            return self.tail
        for stored, value in self.tempered_tails.items():
            if math.isclose(stored, temperature, rel_tol=1e-6):
                return value
        if temperature not in _warned_temperatures:
            _warned_temperatures.add(temperature)
            logger.warning(
                "the teacher cache holds no tail statistics for temperature %g (it has %s); the tail bucket "
                "assumes its mass is spread evenly over the %d tokens outside the top %d",
                temperature,
                ", ".join(f"{t:g}" for t in sorted(self.tempered_tails)) or "none",
                self.vocab_size - self.k,
                self.k,
            )
        spread = math.log(self.vocab_size - self.k)
        return self.tail / temperature + (1.0 - 1.0 / temperature) * spread

    def bucket_log_probs(self, temperature: float) -> Tensor:
        """``[N, k (+1)]`` normalised teacher log-probs at ``temperature`` over the k ids (and the bucket)."""
        dtype = torch.float64 if self.logprobs.dtype == torch.float64 else torch.float32
        columns = self.logprobs.to(dtype) / temperature
        if self.has_tail:
            columns = torch.cat([columns, self.tail_at(temperature).to(dtype).unsqueeze(1)], dim=1)
        return F.log_softmax(columns, dim=-1)


def spread_bucket(ids: Tensor, bucket: Tensor, vocab_size: int) -> Tensor:
    """``[N, V]`` teacher log-probs from bucket log-probs: the k stored tokens keep theirs, the tail
    bucket's mass is shared evenly by the other ``V - k`` tokens (``tail_mode="uniform"``)."""
    k = ids.shape[-1]
    if bucket.shape[-1] == k:  # k = V: nothing to spread
        empty = torch.full((ids.shape[0], vocab_size), -math.inf, dtype=bucket.dtype, device=bucket.device)
        return empty.scatter(-1, ids, bucket)
    spread = bucket[:, k:] - math.log(vocab_size - k)
    return spread.expand(-1, vocab_size).scatter(-1, ids, bucket[:, :k])


def student_bucket_log_probs(scaled_logits: Tensor, ids: Tensor, with_tail: bool) -> Tensor:
    """``[N, k (+1)]`` student log-probs of the teacher's k ids and (with_tail) of everything else."""
    lse = torch.logsumexp(scaled_logits, dim=-1, keepdim=True)
    top = scaled_logits.gather(-1, ids) - lse
    if not with_tail:
        return top
    rest = scaled_logits.scatter(-1, ids, -math.inf)
    return torch.cat([top, torch.logsumexp(rest, dim=-1, keepdim=True) - lse], dim=-1)


def sparse_log_probs(student: Tensor, teacher: SparseTeacher, temperature: float) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probs that the divergence compares, from ``[N, V]`` student logits of the
    teacher's N rows: over the k + 1 bucket outcomes, or over all V tokens with ``tail_mode="uniform"``."""
    check_sparse_rows(teacher, student.shape[0], student.shape[-1])
    bucket = teacher.bucket_log_probs(temperature)
    student = student if student.dtype == torch.float64 else student.float()
    if teacher.tail_mode == "uniform":
        dense = spread_bucket(teacher.ids, bucket, student.shape[-1]).to(student.dtype)
        return masked_log_probs(student / temperature, dense)
    with_tail = bucket.shape[-1] > teacher.k
    student_bucket = student_bucket_log_probs(student / temperature, teacher.ids, with_tail)
    return masked_log_probs(student_bucket, bucket.to(student_bucket.dtype))


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


def check_sparse_rows(teacher: SparseTeacher, rows: int, vocab: int) -> None:
    """The sparse teacher must hold exactly one row per supervised position, over the same vocabulary."""
    if len(teacher) != rows:
        raise ValueError(
            f"the sparse teacher holds {len(teacher)} rows but the batch has {rows} supervised positions; "
            "the cache must be built from the same data, tokenizer, template and max lengths"
        )
    if teacher.vocab_size != vocab:
        raise ValueError(
            f"the sparse teacher covers a vocabulary of {teacher.vocab_size} but the student has {vocab} logits"
        )
