"""Distillation losses: on materialised logits, and fused with the output projection in chunks."""

from todi.losses.causal_lm import causal_lm_distillation_loss
from todi.losses.fused import FusedLinearDistillationLoss, auto_chunk_size, fused_linear_distillation_loss
from todi.losses.objective import LossOutput, distillation_loss, sparse_distillation_loss
from todi.losses.sparse import SparseTeacher

__all__ = [
    "FusedLinearDistillationLoss",
    "LossOutput",
    "SparseTeacher",
    "auto_chunk_size",
    "causal_lm_distillation_loss",
    "distillation_loss",
    "fused_linear_distillation_loss",
    "sparse_distillation_loss",
]
