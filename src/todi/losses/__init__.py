"""Distillation losses: on materialised logits, and fused with the output projection in chunks."""

from todi.losses.objective import LossOutput, distillation_loss

__all__ = ["LossOutput", "distillation_loss"]
