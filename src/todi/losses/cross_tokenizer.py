"""Distillation between a teacher and a student whose tokenizers differ (see docs/cross_tokenizer.md).

At a student position aligned with a teacher position (same text prefix, :mod:`todi.xtok.alignment`):

* ``hybrid``: a registered divergence (ToDi, FKL, ...) between the two distributions restricted to the
  matched vocabulary (:mod:`todi.xtok.vocab`), each renormalised over it, plus ``uld_weight`` times
  ULD on the unmatched remainders (their probabilities, not renormalised, so this term also carries how
  much mass each side puts outside the matched tokens);
* ``uld``: ULD on the whole distributions (Boizard et al. 2024).

ULD between probability vectors of different lengths is the L1 distance of both sorted in descending
order, the shorter padded with zeros: it compares the shapes of the distributions and forgets which token
is which. Both sides use softmax(logits / T) in float32 (float64 stays float64). The CE term is the
student's own, on all its supervised tokens; positions without an aligned teacher position add no KD.
Sums are normalised by the supervised-token count of the global batch, as in
:func:`todi.losses.distillation_loss`, so with identical tokenizers ``hybrid`` is the plain objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from todi.divergences import get_divergence, log_probs, todi_weight
from todi.losses.causal_lm import _model_inputs, final_hidden_states, output_head
from todi.losses.fused import auto_chunk_size
from todi.losses.objective import LossOutput, check_objective, normaliser
from todi.losses.sparse import SparseTeacher

__all__ = [
    "MatchedVocab",
    "causal_lm_cross_tokenizer_loss",
    "cross_tokenizer_divergence",
    "cross_tokenizer_loss",
    "uld_distance",
]

Mode = Literal["hybrid", "uld"]
MODES: tuple[str, ...] = ("hybrid", "uld")


@dataclass(frozen=True)
class MatchedVocab:
    """Index tensors of the matched pairs (``student[i] <-> teacher[i]``) and of each side's remainder."""

    student: Tensor
    teacher: Tensor
    student_rest: Tensor
    teacher_rest: Tensor

    @classmethod
    def from_ids(
        cls,
        student_ids: list[int] | tuple[int, ...],
        teacher_ids: list[int] | tuple[int, ...],
        student_size: int,
        teacher_size: int,
        device: torch.device | str | None = None,
    ) -> MatchedVocab:
        if len(student_ids) != len(teacher_ids):
            raise ValueError(f"{len(student_ids)} student ids but {len(teacher_ids)} teacher ids")
        student = torch.tensor(list(student_ids), dtype=torch.long, device=device)
        teacher = torch.tensor(list(teacher_ids), dtype=torch.long, device=device)
        return cls(student, teacher, _rest(student, student_size), _rest(teacher, teacher_size))


def _rest(matched: Tensor, size: int) -> Tensor:
    mask = torch.ones(size, dtype=torch.bool, device=matched.device)
    mask[matched] = False
    return mask.nonzero().squeeze(-1)


def uld_distance(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Per row, sum_i |q_(i) - p_(i)| with both rows sorted descending and the shorter padded with zeros."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    if width == 0:
        return student_probs.new_zeros(student_probs.shape[:-1])
    q = F.pad(student_probs.sort(dim=-1, descending=True).values, (0, width - student_probs.shape[-1]))
    p = F.pad(teacher_probs.sort(dim=-1, descending=True).values, (0, width - teacher_probs.shape[-1]))
    return (q - p).abs().sum(-1)


def cross_tokenizer_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mode: Mode = "hybrid",
    vocab: MatchedVocab | None = None,
    divergence: str = "todi",
    temperature: float = 2.0,
    uld_weight: float = 1.0,
    **params: float,
) -> tuple[Tensor, Tensor | None]:
    """Per aligned position (rows of ``[A, Vs]`` and ``[A, Vt]`` logits), the KD value; and ToDi's FKL share
    on the matched vocabulary (None for other divergences and for ``uld``)."""
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    s, t = student_logits.to(dtype) / temperature, teacher_logits.to(dtype) / temperature
    if mode == "uld":
        return uld_distance(s.softmax(-1), t.softmax(-1)), None
    if mode != "hybrid":
        raise ValueError(f"unknown cross-tokenizer mode {mode!r}; choose one of {', '.join(MODES)}")
    if vocab is None:
        raise ValueError("mode 'hybrid' needs the matched vocabulary (vocab=MatchedVocab...)")
    registered = get_divergence(divergence)
    resolved = registered.resolve(params)
    # Renormalised over the matched tokens: a log-softmax of just their logits.
    ls, lt = log_probs(s[:, vocab.student], t[:, vocab.teacher])
    value = registered.fn(ls, lt, **resolved)
    share = todi_weight(ls, lt, resolved["beta"]) if divergence == "todi" else None
    if uld_weight and (vocab.student_rest.numel() or vocab.teacher_rest.numel()):
        q_rest = s.log_softmax(-1)[:, vocab.student_rest].exp()
        p_rest = t.log_softmax(-1)[:, vocab.teacher_rest].exp()
        value = value + uld_weight * uld_distance(q_rest, p_rest)
    return value, share


def _sums(
    student_logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None,
    aligned: Tensor,
    kd_rate: float,
    kd: dict,
    stand_in: Tensor | None = None,
) -> Tensor:
    """[CE sum, KD sum, FKL-share sum] over rows; ``aligned`` picks the rows ``teacher_logits`` belongs to.
    ``stand_in`` (bool per row, ``--unaligned ce``): with a teacher, the KD sum also holds the CE of those
    rows that have no teacher row."""
    math_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    zero = student_logits.new_zeros((), dtype=math_dtype)
    ce = F.cross_entropy(student_logits.to(math_dtype), targets, reduction="sum") if kd_rate < 1 else zero
    kd_sum = share_sum = zero
    if teacher_logits is not None and aligned.numel():
        value, share = cross_tokenizer_divergence(student_logits[aligned], teacher_logits, **kd)
        kd_sum = value.sum().to(math_dtype)
        if share is not None:
            share_sum = share.sum().to(math_dtype)
    if stand_in is not None and teacher_logits is not None:
        without = stand_in.clone()
        without[aligned] = False
        kd_sum = kd_sum + F.cross_entropy(
            student_logits[without].to(math_dtype), targets[without], reduction="sum"
        )
    return torch.stack([ce, kd_sum, share_sum.detach()])


def _output(
    sums: Tensor, num_rows: int, num_aligned: int, kd_rate: float, num_items: int | Tensor | None, kd: dict
) -> LossOutput:
    denom = normaliser(torch.tensor(num_rows, device=sums.device), num_items_in_batch=num_items)
    ce, kd_sum, share = sums[0], sums[1], sums[2]
    loss = ((1.0 - kd_rate) * ce + kd_rate * kd_sum) / denom
    with_share = kd.get("mode", "hybrid") == "hybrid" and kd.get("divergence", "todi") == "todi"
    return LossOutput(
        loss=loss,
        ce=(ce / denom).detach(),
        kd=(kd_sum / denom).detach(),
        num_tokens=num_rows,
        todi_weight=(share / max(num_aligned, 1)).detach() if with_share and num_aligned else None,
    )


def cross_tokenizer_loss(
    student_logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None,
    aligned: Tensor,
    *,
    kd_rate: float = 0.5,
    num_items_in_batch: int | Tensor | None = None,
    mode: Mode = "hybrid",
    vocab: MatchedVocab | None = None,
    divergence: str = "todi",
    temperature: float = 2.0,
    uld_weight: float = 1.0,
    unaligned: str = "ce",
    **params: float,
) -> LossOutput:
    """``(1 - kd_rate) CE + kd_rate KD`` on materialised rows.

    Args:
        student_logits: ``[N, Vs]`` the student's logits at its supervised positions.
        targets: ``[N]`` the student's own next tokens there (the CE term).
        teacher_logits: ``[A, Vt]`` the teacher's logits at the positions aligned with ``aligned``.
        aligned: ``[A]`` long, which of the N rows each teacher row is aligned with.
        unaligned: what the KD term does at the rows without a teacher row: ``skip`` (nothing: they get
            the CE term alone) or ``ce`` (the data's token stands in for the teacher: their CE, so they
            get the full CE weight; see docs/cross_tokenizer.md).
        Other arguments as in :func:`cross_tokenizer_divergence` and :func:`todi.losses.distillation_loss`.
    """
    check_objective(kd_rate, temperature)
    kd = dict(mode=mode, vocab=vocab, divergence=divergence, temperature=temperature, uld_weight=uld_weight)
    kd |= params
    stand_in = torch.ones_like(targets, dtype=torch.bool) if unaligned == "ce" else None
    sums = _sums(student_logits, targets, teacher_logits, aligned, kd_rate, kd, stand_in)
    return _output(sums, student_logits.shape[0], aligned.numel(), kd_rate, num_items_in_batch, kd)


def _stand_in_rows(unaligned: str, batch: dict[str, Tensor], rows: Tensor, width: int) -> Tensor | None:
    """Per supervised row, whether its CE stands in for a missing teacher row (``--unaligned ce``): every
    row but those of examples the batch marks as the student's own samples (``xtok_stand_in``)."""
    if unaligned == "skip":
        return None
    if unaligned != "ce":
        raise ValueError(f"unaligned must be 'ce' or 'skip', got {unaligned!r}")
    marks = batch.get("xtok_stand_in")
    if marks is None:
        return torch.ones_like(rows, dtype=torch.bool)
    return marks.to(rows.device)[rows // width]


def _cached_teacher_logits(rows: SparseTeacher, temperature: float) -> Tensor:
    """Teacher "logits" of cached rows: ``T * log p_T`` over the teacher's vocabulary, which
    :func:`cross_tokenizer_divergence` divides by T and softmaxes back into ``p_T`` exactly."""
    return temperature * rows.dense_log_probs(temperature)


def causal_lm_cross_tokenizer_loss(
    student: nn.Module,
    teacher: nn.Module | SparseTeacher | None,
    batch: dict[str, Tensor],
    *,
    student_vocab: int,
    teacher_vocab: int,
    kd_rate: float = 0.5,
    num_items_in_batch: int | Tensor | None = None,
    fused: bool = True,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    **kd: object,
) -> LossOutput:
    """Run both models on a paired batch and return the objective.

    ``batch`` holds the student's ``input_ids`` / ``attention_mask`` / ``position_ids`` / unshifted
    ``labels``, the teacher's ``teacher_input_ids`` / ``teacher_attention_mask`` / ``teacher_position_ids``,
    and ``xtok_teacher_pos`` ``[B, T_student - 1]``: per student position, the aligned teacher position
    (after the shift) or -1 (:class:`todi.xtok.CrossTokenizerTeacher` builds them). ``teacher`` may be the
    rows of a teacher cache (:class:`~todi.losses.sparse.SparseTeacher`, the supervised positions of the
    batch's teacher encodings in order, tail mode ``uniform`` or ``sampled``): the batch then holds
    ``xtok_cache_row`` ``[B, T_student - 1]``, per student position the aligned row of ``teacher`` or -1,
    and each chunk rebuilds the teacher's ``[A, Vt]`` distribution from its rows. ``student_vocab`` /
    ``teacher_vocab`` slice padded heads to their tokenizers. ``fused``: the student's logits are built
    ``chunk_size`` rows at a time and rebuilt in the backward pass (memory O(chunk x V), not O(N x V));
    the teacher's only at aligned positions. Other keyword arguments go to :func:`cross_tokenizer_loss`.
    """
    check_objective(kd_rate, float(kd.get("temperature", 2.0)))  # type: ignore[arg-type]
    labels = batch["labels"][:, 1:]
    width = labels.shape[1]
    keep = (labels != ignore_index).reshape(-1)
    rows = keep.nonzero().squeeze(-1)
    targets = labels.reshape(-1)[rows]
    use_teacher = teacher is not None and kd_rate > 0
    aligned = rows.new_zeros(0)
    teacher_rows: Tensor | None = None
    temperature = float(kd.get("temperature", 2.0))  # type: ignore[arg-type]
    cached: SparseTeacher | None = None
    if use_teacher and isinstance(teacher, SparseTeacher):
        cache_rows = batch["xtok_cache_row"].reshape(-1)[rows]
        aligned = (cache_rows >= 0).nonzero().squeeze(-1)
        cached = teacher.select(cache_rows[aligned])
        if cached.vocab_size != teacher_vocab:
            raise ValueError(f"the cached teacher covers {cached.vocab_size} tokens, not {teacher_vocab}")
    elif use_teacher:
        teacher_pos = batch["xtok_teacher_pos"].reshape(-1)[rows]
        aligned = (teacher_pos >= 0).nonzero().squeeze(-1)
        teacher_width = batch["teacher_input_ids"].shape[1] - 1
        teacher_rows = rows[aligned] // width * teacher_width + teacher_pos[aligned]
    teacher_inputs = {
        "input_ids": batch.get("teacher_input_ids"),
        "attention_mask": batch.get("teacher_attention_mask"),
        "position_ids": batch.get("teacher_position_ids"),
    }

    kd_options = dict(kd)
    stand_in = _stand_in_rows(str(kd_options.pop("unaligned", "ce")), batch, rows, width)
    if not fused:
        student_logits = student(**_model_inputs(batch)).logits[:, :-1, :student_vocab]
        teacher_logits = None
        if cached is not None:
            teacher_logits = _cached_teacher_logits(cached, temperature)
        elif use_teacher:
            with torch.no_grad():
                all_teacher = teacher(**_model_inputs(teacher_inputs)).logits[:, :-1, :teacher_vocab]
                teacher_logits = all_teacher.reshape(-1, all_teacher.shape[-1])[teacher_rows]
        flat = student_logits.reshape(-1, student_logits.shape[-1])[rows]
        sums = _sums(flat, targets, teacher_logits, aligned, kd_rate, kd_options, stand_in)
        return _output(sums, rows.numel(), aligned.numel(), kd_rate, num_items_in_batch, kd_options)

    head = output_head(student)
    hidden = final_hidden_states(student, batch, head)[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
    weight = head.weight[:student_vocab]
    bias = None if getattr(head, "bias", None) is None else head.bias[:student_vocab]
    teacher_hidden = teacher_weight = teacher_bias = None
    if use_teacher and cached is None:
        teacher_head = output_head(teacher)
        with torch.no_grad():
            t_hidden = final_hidden_states(teacher, teacher_inputs, teacher_head)[:, :-1]
            teacher_hidden = t_hidden.reshape(-1, t_hidden.shape[-1])[teacher_rows]
        teacher_weight = teacher_head.weight[:teacher_vocab]
        tb = getattr(teacher_head, "bias", None)
        teacher_bias = None if tb is None else tb[:teacher_vocab]
    n = rows.numel()
    size = chunk_size or auto_chunk_size(n, student_vocab + teacher_vocab)
    sums = hidden.new_zeros(3, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    if n == 0:  # still a graph to backpropagate through (zero gradients), as distillation_loss gives
        sums = sums + 0.0 * hidden.sum()
    for start in range(0, n, size):
        stop = min(start + size, n)
        in_chunk = (aligned >= start) & (aligned < stop)
        local = aligned[in_chunk] - start
        t_chunk = None if teacher_hidden is None else teacher_hidden[in_chunk]
        c_chunk = None if cached is None else cached.select(in_chunk)

        def chunk_sums(
            h: Tensor, t_chunk=t_chunk, c_chunk=c_chunk, local=local, start=start, stop=stop
        ) -> Tensor:
            logits = F.linear(h, weight, bias)
            t_logits = None
            if c_chunk is not None:
                t_logits = _cached_teacher_logits(c_chunk, temperature)
            elif t_chunk is not None:
                with torch.no_grad():
                    t_logits = F.linear(t_chunk, teacher_weight, teacher_bias)
            rows_in = None if stand_in is None else stand_in[start:stop]
            return _sums(logits, targets[start:stop], t_logits, local, kd_rate, kd_options, rows_in)

        if torch.is_grad_enabled() and hidden.requires_grad:
            sums = sums + checkpoint(chunk_sums, hidden[start:stop], use_reentrant=False)
        else:
            sums = sums + chunk_sums(hidden[start:stop])
    return _output(sums, n, aligned.numel(), kd_rate, num_items_in_batch, kd_options)
