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
moves much of the teacher's mass into the tail (docs/performance.md measures the cost). Two other tail
modes give the student's tail tokens a gradient of their own; the divergence then runs on all V tokens
(the dense kernel), against a teacher that keeps its k stored log-probabilities and the bucket's exact
mass B at T, shared out over the ``V - k`` tail tokens:

- ``tail_mode="uniform"``: evenly, ``B / (V - k)`` each.
- ``tail_mode="sampled"``: by tail tokens the cache drew from the teacher's own tail at T
  (``todi cache-teacher --tail-samples M``). A token drawn c of a row's m draws gets
  ``B * ((1 - f) * c / m + f / (V - k))``, with ``f = TAIL_FLOOR`` of the mass kept evenly spread so
  that every token has a finite teacher log-probability (RKL and ToDi divide by it). Averaged over the
  draws this teacher is ``(1 - f)`` times the true tail plus ``f`` times the even one, so divergences
  linear in the teacher (FKL's gradient) get the tail right on average over the training positions
  instead of never: the estimator of Sparse Logit Sampling (Anshumann et al., ACL 2025), here on the tail
  of a top-k cache. Two choices cut its variance at no cost in bias: the draws are systematic (one
  uniform offset, m evenly spaced points on the tail's cumulative distribution, so a token holding a
  share w of the tail is drawn floor(m w) or ceil(m w) times), and the cache shares ``M x rows`` draws
  among the positions of each teacher forward chunk in proportion to their tail mass B at T (a position
  whose top k hold nearly everything needs none; a row given none keeps the even spread; at most 255 a
  row). Samples exist only at the temperatures the cache was built for; at another T the mode falls
  back to the even spread, with a warning.

With k = V there is no tail and every mode equals the online loss exactly (tested).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from todi.divergences import masked_log_probs

logger = logging.getLogger(__name__)

__all__ = [
    "TAIL_FLOOR",
    "TAIL_MODES",
    "SparseTeacher",
    "dense_teacher_log_probs",
    "draw_tail",
    "pad_samples",
    "sparse_log_probs",
    "student_bucket_log_probs",
]

TAIL_MODES = ("bucket", "uniform", "sampled")
# Share of the tail mass that tail_mode="sampled" keeps evenly spread. Without it the tokens the cache did
# not draw would have teacher probability 0 and RKL / ToDi an infinite penalty on any student mass there;
# more of it pulls the teacher toward the even spread (whose cost docs/performance.md measures).
TAIL_FLOOR = 0.1
NO_SAMPLE = -1  # padding of a row's tail samples
MAX_ROW_SAMPLES = 255  # draws one row may get (its count is stored in one byte)

_warned_temperatures: set[tuple[str, float]] = set()  # (what, T) warned once


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
    # "bucket": divergences on k + 1 outcomes; "uniform" / "sampled": on all V tokens, the teacher's tail
    # mass (at the distillation temperature) spread evenly / by the tail samples (module docstring).
    tail_mode: str = "bucket"
    # T -> [N, m_max] int64 tail ids drawn at T (tail_mode="sampled"); row i holds its m_i draws first,
    # then -1 (NO_SAMPLE) padding.
    tail_samples: dict[float, Tensor] = field(default_factory=dict)

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
        for t, samples in self.tail_samples.items():
            if samples.dim() != 2 or samples.shape[0] != self.ids.shape[0]:
                raise ValueError(
                    f"tail samples at T = {t:g} must be [N, M] with N = {self.ids.shape[0]}; "
                    f"got {tuple(samples.shape)}"
                )

    @classmethod
    def from_logits(
        cls,
        logits: Tensor,
        k: int,
        temperatures: tuple[float, ...] = (2.0,),
        *,
        tail_samples: int = 0,
        generator: torch.Generator | None = None,
    ) -> SparseTeacher:
        """Keep the top ``k`` of each row of ``[N, V]`` teacher logits (temperature 1) and the tail
        statistics for ``temperatures``: the power sum (except at 1, where it is the tail itself) and,
        with ``tail_samples`` = M > 0, ``M x N`` tail draws at each temperature shared among the rows in
        proportion to their tail mass there (:func:`draw_tail`; ``generator`` makes them reproducible).
        Ties at the k-th place are broken by ``torch.topk``."""
        logits = logits.float()
        vocab = logits.shape[-1]
        if not 1 <= k <= vocab:
            raise ValueError(f"k must be in [1, {vocab}], got {k}")
        if tail_samples < 0:
            raise ValueError(f"tail_samples must be >= 0, got {tail_samples}")
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        values, ids = logits.topk(k, dim=-1)
        # The tail from the logits left out, not log(1 - sum p): exact even when the tail mass is tiny.
        rest = logits.scatter(-1, ids, -math.inf) - lse
        tail = torch.logsumexp(rest, dim=-1)
        tempered = {float(t): torch.logsumexp(rest / t, dim=-1) for t in temperatures if t != 1.0}
        samples = {}
        if tail_samples:
            logp = logits - lse
            samples = {float(t): draw_tail(logp, ids, t, tail_samples, generator) for t in temperatures}
        return cls(ids, values - lse, tail, vocab, tempered, tail_samples=samples)

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
        return SparseTeacher(
            fn(self.ids),
            fn(self.logprobs),
            fn(self.tail),
            self.vocab_size,
            {t: fn(v) for t, v in self.tempered_tails.items()},
            self.tail_mode,
            {t: fn(v) for t, v in self.tail_samples.items()},
        )

    def to(self, device: torch.device | str) -> SparseTeacher:
        return self.apply(lambda t: t.to(device))

    def slice(self, start: int, end: int) -> SparseTeacher:
        """Rows ``start`` to ``end`` (exclusive)."""
        return self.apply(lambda t: t[start:end])

    def select(self, rows: Tensor) -> SparseTeacher:
        """The rows listed in ``rows`` (long or bool index), in that order."""
        return self.apply(lambda t: t[rows])

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
            {t: pad_samples([p.tail_samples[t] for p in parts]) for t in first.tail_samples},
        )

    def tail_at(self, temperature: float) -> Tensor:
        """``log sum_{v in tail} p_v ** (1 / T)`` per row (unnormalised bucket weight at temperature T)."""
        if temperature == 1.0:
            return self.tail
        stored = _stored_at(self.tempered_tails, temperature)
        if stored is not None:
            return stored
        if ("tail", temperature) not in _warned_temperatures:
            _warned_temperatures.add(("tail", temperature))
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

    def samples_at(self, temperature: float) -> Tensor | None:
        """``[N, M]`` tail samples drawn at ``temperature`` (None, with a warning once, if the cache has
        none there: tail_mode="sampled" then spreads the tail evenly)."""
        stored = _stored_at(self.tail_samples, temperature)
        if stored is not None:
            return stored
        if ("samples", temperature) not in _warned_temperatures:
            _warned_temperatures.add(("samples", temperature))
            logger.warning(
                "the teacher cache holds no tail samples for temperature %g (it has %s); tail_mode='sampled' "
                "spreads the tail mass evenly instead (rebuild with `todi cache-teacher --temperatures %g`)",
                temperature,
                ", ".join(f"{t:g}" for t in sorted(self.tail_samples)) or "none",
                temperature,
            )
        return None

    def kernel_inputs(self, temperature: float) -> tuple[Tensor, Tensor, bool, Tensor | None]:
        """(ids, teacher log-probs at T over them and the bucket, dense, tail samples): what the kernels
        need. ``dense``: the divergence runs on all V tokens, the bucket's mass spread evenly or (with
        ``samples``) by the draws, :func:`dense_teacher_log_probs`; otherwise on the k + 1 outcomes."""
        bucket = self.bucket_log_probs(temperature)
        if self.tail_mode == "bucket" or not self.has_tail:
            return self.ids, bucket, False, None
        samples = self.samples_at(temperature) if self.tail_mode == "sampled" else None
        return self.ids, bucket, True, samples

    def dense_log_probs(self, temperature: float) -> Tensor:
        """``[N, V]`` teacher log-probs at ``temperature`` over the whole vocabulary: the stored tokens keep
        theirs and the tail mass is spread evenly (``uniform``) or by the tail samples (``sampled``), as
        :func:`dense_teacher_log_probs` does; exact when k = V. ``bucket`` has no per-token tail to give."""
        if self.tail_mode == "bucket" and self.has_tail:
            raise ValueError(
                "tail_mode 'bucket' has no per-token teacher distribution; use uniform or sampled"
            )
        ids, bucket, _, samples = self.kernel_inputs(temperature)
        return dense_teacher_log_probs(ids, bucket, self.vocab_size, samples)

    def bucket_log_probs(self, temperature: float) -> Tensor:
        """``[N, k (+1)]`` normalised teacher log-probs at ``temperature`` over the k ids (and the bucket)."""
        dtype = torch.float64 if self.logprobs.dtype == torch.float64 else torch.float32
        columns = self.logprobs.to(dtype) / temperature
        if self.has_tail:
            columns = torch.cat([columns, self.tail_at(temperature).to(dtype).unsqueeze(1)], dim=1)
        return F.log_softmax(columns, dim=-1)


def _stored_at(table: dict[float, Tensor], temperature: float) -> Tensor | None:
    """The entry of a per-temperature table stored for ``temperature`` (up to float rounding), or None."""
    return next((v for t, v in table.items() if math.isclose(t, temperature, rel_tol=1e-6)), None)


def draw_tail(
    logp: Tensor, ids: Tensor, temperature: float, m: int, generator: torch.Generator | None
) -> Tensor:
    """``[N, m_max]`` tail ids per row (padded with NO_SAMPLE): ``m x N`` draws from the teacher's tail at
    ``temperature`` (``logp``: ``[N, V]`` log-probs at temperature 1, ``ids``: its top k), shared among the
    rows in proportion to the mass their tail holds at that temperature (largest remainders; at most
    MAX_ROW_SAMPLES a row). Each row's are drawn systematically: one uniform offset u, points (u + j) / m_i
    on the cumulative distribution of the row's tail, so a token is drawn m_i times its share of the tail
    on average and never more than one draw away from that."""
    n, vocab = logp.shape
    if ids.shape[-1] == vocab or n == 0:  # k = V: no tail to draw from
        return ids.new_empty((n, 0))
    tempered = logp / temperature
    rest = tempered.scatter(-1, ids, -math.inf)
    tail_lse = torch.logsumexp(rest, dim=-1)
    counts = _allot(torch.exp(tail_lse - torch.logsumexp(tempered, dim=-1)).nan_to_num(0.0), m * n)
    m_max = int(counts.max())
    if m_max == 0:
        return ids.new_full((n, 0), NO_SAMPLE)
    # float64: the cumulative sum runs over up to V tail tokens (in vocabulary order: the floor / ceil
    # property holds in any order, and sorting [N, V] would cost more than the rest of the build)
    weights = torch.exp(rest.double() - tail_lse.double().unsqueeze(-1)).nan_to_num(0.0)  # no tail: all 0
    cdf = weights.cumsum(-1)
    u = torch.rand(n, 1, generator=generator, device=logp.device, dtype=cdf.dtype)
    j = torch.arange(m_max, device=logp.device, dtype=cdf.dtype)
    points = (u + j) / counts.clamp_min(1).unsqueeze(-1).to(cdf.dtype)
    # A point past the last cumulative value (rounding) takes the row's last token with weight > 0.
    last = torch.where(weights > 0, torch.arange(vocab, device=logp.device), 0).amax(-1, keepdim=True)
    # right: a point on a plateau of the cumulative sum (zero-weight tokens) goes to the next real token
    drawn = torch.minimum(torch.searchsorted(cdf, points, right=True), last)
    return torch.where(j < counts.unsqueeze(-1), drawn, NO_SAMPLE)


def _allot(mass: Tensor, total: int) -> Tensor:
    """``total`` draws shared among rows in proportion to ``mass`` (largest remainders), each at most
    MAX_ROW_SAMPLES (the excess is dropped)."""
    if float(mass.sum()) <= 0:
        return torch.zeros_like(mass, dtype=torch.int64)
    share = mass.double() / mass.double().sum() * total
    counts = share.floor().long()
    left = total - int(counts.sum())
    if left > 0:
        counts[(share - counts).argsort(descending=True)[:left]] += 1
    # a row without tail mass never draws (rounding could otherwise hand it a remainder); past the cap
    # a row's extra draws are dropped, not passed on
    return torch.where(mass > 0, counts, 0).clamp_max(MAX_ROW_SAMPLES)


def pad_samples(parts: list[Tensor]) -> Tensor:
    """Row blocks of tail samples of different widths, stacked into one ``[N, m_max]`` (NO_SAMPLE padding)."""
    width = max(p.shape[-1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[-1]), value=NO_SAMPLE) for p in parts])


def dense_teacher_log_probs(
    ids: Tensor, bucket: Tensor, vocab_size: int, samples: Tensor | None = None
) -> Tensor:
    """``[N, V]`` teacher log-probs from bucket log-probs: the k stored tokens keep theirs and the tail
    bucket's mass B is shared by the other ``V - k`` tokens, evenly (``samples`` None,
    tail_mode="uniform") or by the ``[N, m_max]`` tail samples, ``B * ((1 - f) * c / m + f / (V - k))``
    for a token drawn c of its row's m times (tail_mode="sampled", f = TAIL_FLOOR; evenly in a row with
    no draws)."""
    k = ids.shape[-1]
    if bucket.shape[-1] == k:  # k = V: nothing to spread
        empty = torch.full((ids.shape[0], vocab_size), -math.inf, dtype=bucket.dtype, device=bucket.device)
        return empty.scatter(-1, ids, bucket)
    spread = bucket[:, k:] - math.log(vocab_size - k)
    if samples is None or samples.shape[-1] == 0:
        return spread.expand(-1, vocab_size).scatter(-1, ids, bucket[:, :k])
    valid = samples != NO_SAMPLE
    m = valid.sum(-1, keepdim=True)
    # Counts from the [N, m, m] comparison, not an [N, V] histogram: one pass over [N, V] in all.
    counts = ((samples.unsqueeze(-1) == samples.unsqueeze(-2)) & valid.unsqueeze(-2)).sum(-1).to(bucket.dtype)
    relative = TAIL_FLOOR + counts * ((1.0 - TAIL_FLOOR) * (vocab_size - k)) / m.clamp_min(1).to(bucket.dtype)
    floor = torch.where(m > 0, math.log(TAIL_FLOOR), 0.0).to(bucket.dtype)  # a row without draws: even
    dense = (spread + floor).expand(-1, vocab_size)
    # Padding slots write to the top-1 id, which the top-k scatter below overwrites.
    targets = torch.where(valid, samples, ids[:, :1])
    dense = dense.scatter(-1, targets, spread + torch.log(relative))
    return dense.scatter(-1, ids, bucket[:, :k])


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
    teacher's N rows: over the k + 1 bucket outcomes, or over all V tokens in the dense tail modes."""
    check_sparse_rows(teacher, student.shape[0], student.shape[-1])
    student = student if student.dtype == torch.float64 else student.float()
    ids, bucket, dense, samples = teacher.kernel_inputs(temperature)
    if dense:
        spread = dense_teacher_log_probs(ids, bucket, student.shape[-1], samples).to(student.dtype)
        return masked_log_probs(student / temperature, spread)
    with_tail = bucket.shape[-1] > ids.shape[-1]
    student_bucket = student_bucket_log_probs(student / temperature, ids, with_tail)
    return masked_log_probs(student_bucket, bucket.to(student_bucket.dtype))


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
