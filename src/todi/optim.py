"""The optimizer and learning-rate schedule of ``todi sft`` / ``todi distill`` (``--optim``, ``--lr-scheduler``).

The defaults, AdamW (PyTorch's, ``foreach``) and todi's cosine schedule (linear warm-up from
``1 / (warmup + 1)``, cosine decay to ``--min-lr``), are what todi always used. The other schedules are
``transformers.get_scheduler``'s, as a ``Trainer`` runs them (its warm-up starts at 0).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "build_optimizer",
    "build_scheduler",
    "cosine_schedule",
    "optimizer_problem",
    "resolve_warmup",
]

OPTIMIZERS = {
    "adamw": "adamw",
    "adamw_torch": "adamw",  # the Trainer's names for the same optimizers
    "adamw_fused": "adamw_fused",
    "adamw_torch_fused": "adamw_fused",
    "sgd": "sgd",
    "adamw_8bit": "adamw_8bit",
    "adamw_bnb_8bit": "adamw_8bit",
}
"""``--optim`` value -> the optimizer it builds."""

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


def optimizer_problem(name: str) -> str | None:
    """Why ``--optim name`` cannot run here (None when it can), checked before anything loads."""
    if OPTIMIZERS.get(name) == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return f"--optim {name} needs the bitsandbytes package (pip install bitsandbytes), which is not installed"
    if name not in OPTIMIZERS:
        return f"--optim: unknown optimizer {name!r} (choose one of {', '.join(OPTIMIZERS)})"
    return None


def build_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """The optimizer ``--optim name`` names, over ``param_groups`` (each with its weight decay)."""
    kind = OPTIMIZERS[name]
    if kind == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr)
    if kind == "adamw_fused":
        try:
            return torch.optim.AdamW(param_groups, lr=lr, fused=True)
        except (RuntimeError, ValueError) as err:
            from todi.errors import UsageError

            raise UsageError(
                f"--optim {name}: this PyTorch cannot run the fused AdamW here ({err})".splitlines()[0],
                "use --optim adamw",
            ) from None
    if kind == "sgd":
        return torch.optim.SGD(param_groups, lr=lr)
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(param_groups, lr=lr)


def resolve_warmup(steps: int, ratio: float, total_steps: int) -> int:
    """Warm-up steps: ``--warmup-steps``, else ``ceil(--warmup-ratio x total)`` as the Trainer rounds it."""
    return steps or math.ceil(ratio * total_steps)


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, warmup: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """``--lr-scheduler name``: todi's cosine (decaying to ``min_ratio`` x lr), or a ``get_scheduler`` one."""
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(warmup, total_steps, min_ratio))
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier for step ``step``: linear warm-up to 1, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    # A plain function on purpose: LambdaLR checkpoints the __dict__ of callable objects, which would
    # pin total_steps on resume; a function is rebuilt from the current options instead.
    return factor
