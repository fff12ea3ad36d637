"""A todi divergence inside TRL's ``GKDTrainer``, through its public hook.

``trl.experimental.gkd.GKDTrainer.compute_loss`` (TRL 1.16) runs student and teacher on the batch (the
dataset's or, with probability ``lmbda``, the student's own sampled completions) and calls
``self.generalized_jsd_loss(student_logits, teacher_logits, labels, beta=..., num_items_in_batch=...)``,
a documented static method. :func:`gkd_divergence` builds a function of that signature that computes
todi's objective instead, so any registered divergence (ToDi included) plugs in with one assignment::

    trainer = GKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), ...)
    trainer.generalized_jsd_loss = gkd_divergence("todi", temperature=2.0, beta=1.0)

or as a class attribute of a subclass: ``generalized_jsd_loss = staticmethod(gkd_divergence(...))``.

TRL's ``DistillationTrainer`` has no such hook: its divergence (generalised JSD, selected by ``beta``) is
computed inside a private chunked kernel, so there todi's divergences need :class:`todi.integrations.TodiTrainer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from todi.divergences import get_divergence
from todi.losses import distillation_loss

__all__ = ["gkd_divergence"]


def gkd_divergence(
    divergence: str = "todi",
    *,
    temperature: float = 2.0,
    kd_rate: float = 1.0,
    **params: float,
) -> Callable[..., Tensor]:
    """A drop-in ``GKDTrainer.generalized_jsd_loss`` computing todi's objective.

    Args:
        divergence: a registered todi divergence (``todi``, ``fkl``, ``rkl``, ``js``, ``tvd``, ``skl``,
            ``srkl``, ``akl``, or one added with ``register_divergence``).
        temperature: divides both logit sets inside the divergence. TRL's ``GKDConfig.temperature`` is the
            *sampling* temperature of the on-policy completions and GKD calls its loss at temperature 1;
            this one is todi's (2.0 by default, the ToDi paper's).
        kd_rate: ``1.0`` (default) gives the divergence alone, as GKD's loss is; below 1 mixes in the
            cross-entropy of the labels, ``(1 - kd_rate) CE + kd_rate KD``.
        params: the divergence's parameters, checked now (e.g. ``beta=1.0`` for ToDi, ``skew=0.1`` for skl).

    The returned function ignores the ``beta`` and ``temperature`` GKD passes (``GKDConfig.beta`` is the
    JSD interpolation weight, meaningless for other divergences). It normalises as GKD does: by
    ``num_items_in_batch`` when GKD passes it, else by the batch's supervised tokens.
    """
    get_divergence(divergence).resolve(params)  # unknown names or bad values fail here, not mid-training
    options = {"divergence": divergence, "kd_rate": kd_rate, "temperature": temperature, **params}

    def generalized_jsd_loss(
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        num_items_in_batch: Any = None,
    ) -> Tensor:
        if labels is None:  # every position counts; the CE needs targets
            if kd_rate < 1:
                raise ValueError("gkd_divergence with kd_rate < 1 needs labels for the cross-entropy")
            labels = student_logits.new_zeros(student_logits.shape[:-1], dtype=torch.long)
        out = distillation_loss(
            student_logits, teacher_logits, labels, num_items_in_batch=num_items_in_batch, **options
        )
        return out.loss

    return generalized_jsd_loss
