"""todi: token-wise distillation (ToDi) and baseline divergences for LLM knowledge distillation."""

from todi.divergences import DIVERGENCES, divergence
from todi.losses import LossOutput, distillation_loss

__version__ = "0.1.0"

__all__ = ["DIVERGENCES", "LossOutput", "__version__", "distillation_loss", "divergence"]
