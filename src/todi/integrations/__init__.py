"""todi inside the trainers people already use: a Hugging Face ``Trainer`` and TRL.

- :class:`TodiTrainer` / :class:`TodiDistillationConfig`: a ``transformers.Trainer`` that trains a
  student with todi's objective (any divergence, fused or not, a teacher model or a teacher cache).
- :func:`gkd_divergence`: a todi divergence in the shape of TRL ``GKDTrainer.generalized_jsd_loss``, the
  public hook through which TRL's GKD trainer computes its loss.

Importing this package imports neither ``transformers.Trainer`` nor ``trl``: the names load on first use.
See docs/integrations.md for the recipes.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TodiBatchPlan", "TodiDistillationConfig", "TodiTrainer", "gkd_divergence"]

_WHERE = {
    "TodiBatchPlan": "todi.integrations.trainer",
    "TodiDistillationConfig": "todi.integrations.trainer",
    "TodiTrainer": "todi.integrations.trainer",
    "gkd_divergence": "todi.integrations.trl",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
