"""The distillation objective for a pair of Hugging Face causal LMs and a batch.

The fused path needs each model's final hidden states (after the last norm) and its output embedding,
not the logits. Architectures differ in where the final norm sits relative to ``hidden_states[-1]``,
so instead the output-embedding module is made an identity for the duration of the forward call: the
model's own forward then returns exactly what it would have fed to its head, for any architecture whose
head is ``logits = lm_head(hidden)``. Models that post-process logits (soft-capping, scaling) are
refused on the fused path, since the head alone would not reproduce their logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from todi.losses.fused import fused_linear_distillation_loss
from todi.losses.objective import LossOutput, distillation_loss, sparse_distillation_loss
from todi.losses.sparse import SparseTeacher

__all__ = ["causal_lm_distillation_loss", "output_head", "shift_labels"]

# Config attributes that mean "logits are transformed after the head".
_POST_PROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model behind DDP / accelerate / torch.compile / PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        else:
            return model


def output_head(model: nn.Module) -> nn.Module:
    """The model's output embedding (its LM head), refusing models whose logits are post-processed."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    for attr in _POST_PROCESSING:
        value = getattr(config, attr, None)
        if value not in (None, 0, 0.0, 1, 1.0, False):
            raise ValueError(
                f"{type(base).__name__} post-processes its logits ({attr}={value}), which the fused loss "
                "does not reproduce; use the materialised path (fused=False, CLI --no-fused)"
            )
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(
            f"{type(base).__name__} has no output embedding with a weight (get_output_embeddings()); "
            "use the materialised path (fused=False, CLI --no-fused)"
        )
    return head


@contextlib.contextmanager
def _head_as_identity(head: nn.Module) -> Iterator[None]:
    original = head.forward
    head.forward = lambda hidden, *args, **kwargs: hidden  # type: ignore[method-assign]
    try:
        yield
    finally:
        head.forward = original  # type: ignore[method-assign]


def _model_inputs(batch: dict[str, Tensor]) -> dict[str, Any]:
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if batch.get(key) is not None:
            inputs[key] = batch[key]
    return inputs


def final_hidden_states(model: nn.Module, batch: dict[str, Tensor], head: nn.Module) -> Tensor:
    """``[B, T, H]`` inputs of the model's head for ``batch`` (grad flows when the caller allows it)."""
    with _head_as_identity(head):
        hidden = model(**_model_inputs(batch)).logits
    if hidden.shape[-1] != head.weight.shape[1]:
        raise ValueError(
            f"{type(unwrap(model)).__name__}: expected hidden states of width {head.weight.shape[1]} from the "
            f"head-less forward, got {tuple(hidden.shape)}; use the materialised path (fused=False, --no-fused)"
        )
    return hidden


def shift_labels(labels: Tensor) -> Tensor:
    """Labels aligned with the positions that predict them: drop the first, as the logits drop the last."""
    return labels[:, 1:]


def causal_lm_distillation_loss(
    student: nn.Module,
    teacher: nn.Module | SparseTeacher | None,
    batch: dict[str, Tensor],
    *,
    divergence: str = "todi",
    kd_rate: float = 0.5,
    temperature: float = 2.0,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    fused: bool = True,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    compile: bool | None = None,
    backend: str = "auto",
    **params: float | str,
) -> LossOutput:
    """Run both models on ``batch`` and return the distillation objective.

    Args:
        student: a causal LM (HF ``*ForCausalLM``, possibly wrapped by DDP / PEFT); gradients flow.
        teacher: the same for the teacher, run under ``no_grad``; None for plain SFT (``kd_rate=0``);
            or a :class:`todi.losses.SparseTeacher` (one row per supervised position of the batch, e.g.
            from a teacher cache), whose vocabulary size then slices the student's head.
        batch: ``input_ids``, ``attention_mask``, optional ``position_ids``, and ``labels`` NOT shifted
            (Hugging Face convention: aligned with ``input_ids``, -100 on prompt and padding).
        fused: use :func:`todi.losses.fused_linear_distillation_loss` (the [N, V] logits are never
            built); False computes full logits and calls :func:`todi.losses.distillation_loss`.
        vocab_size: use only the first ``vocab_size`` logits of each head (heads padded beyond the
            tokenizer, e.g. 152,064 rows for 151,936 tokens).
        backend: the fused loss's chunk math, ``"auto"`` / ``"triton"`` / ``"torch"`` (see
            :func:`todi.losses.fused_linear_distillation_loss`); unused with ``fused=False``.
        Other arguments as in :func:`todi.losses.distillation_loss`.
    """
    if teacher is None and kd_rate > 0:
        raise ValueError("teacher is None but kd_rate > 0; pass a teacher or set kd_rate=0 for SFT")
    labels = shift_labels(batch["labels"])
    common = dict(
        divergence=divergence,
        kd_rate=kd_rate,
        temperature=temperature,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        **params,
    )
    if isinstance(teacher, SparseTeacher):
        vocab_size = teacher.vocab_size
    if not fused:
        student_logits = student(**_model_inputs(batch)).logits[:, :-1, :vocab_size]
        if isinstance(teacher, SparseTeacher):
            return sparse_distillation_loss(student_logits, teacher, labels, **common)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(**_model_inputs(batch)).logits[:, :-1, :vocab_size]
        return distillation_loss(student_logits, teacher_logits, labels, **common)

    student_head = output_head(student)
    student_hidden = final_hidden_states(student, batch, student_head)[:, :-1]
    teacher_hidden = teacher_weight = teacher_bias = sparse = None
    if isinstance(teacher, SparseTeacher):
        sparse = teacher
    elif teacher is not None:
        teacher_head = output_head(teacher)
        with torch.no_grad():
            teacher_hidden = final_hidden_states(teacher, batch, teacher_head)[:, :-1]
        teacher_weight = teacher_head.weight[:vocab_size]
        teacher_bias = None if getattr(teacher_head, "bias", None) is None else teacher_head.bias[:vocab_size]
    student_bias = None if getattr(student_head, "bias", None) is None else student_head.bias[:vocab_size]
    return fused_linear_distillation_loss(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_head.weight[:vocab_size],
        None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight,
        labels.reshape(-1),
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        chunk_size=chunk_size,
        compile=compile,
        sparse_teacher=sparse,
        backend=backend,
        **common,
    )
