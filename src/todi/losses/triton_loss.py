"""The Triton backend of the fused loss: which backend a call takes, and one chunk through the row kernel.

The torch backend of :mod:`todi.losses.fused` upcasts each ``[chunk, V]`` logits block to float32 and runs
the softmax, divergence and gradient as separate tensor operations (fused by ``torch.compile`` where it
can). The Triton backend keeps both logits blocks in the model's dtype and runs one row kernel
(:mod:`todi.losses.triton_kernel`) that reads them two or three times in float32 registers and writes
``d loss / d student logits`` over the student block, with 1/T, the kd_rate and the global token
normaliser folded in; the chunk loop, the head matmuls and autograd stay in fused.py.

Served: CE alone and CE + fkl, rkl, js, tvd, skl, srkl, todi (any temperature and parameters) against a
dense teacher (hidden states and head). On the torch backend always: akl (its sort over the vocabulary does
not fit a row kernel's passes), sparse (cached) teachers, divergences registered by users.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["BACKENDS", "KERNEL_DIVERGENCES", "resolve_backend", "triton_chunk_size"]

BACKENDS = ("auto", "triton", "torch")
# The divergences the row kernel computes, with their codes in triton_kernel.
KERNEL_DIVERGENCES = {"fkl": 1, "rkl": 2, "js": 3, "tvd": 4, "skl": 5, "srkl": 6, "todi": 7}
# Budget for the chunk's logits blocks (student + teacher, model dtype): the kernel needs no float32 copy,
# so twice the torch backend's rows fit in less memory. Not tuned on a GPU yet.
_LOGITS_BYTES = 256 * 2**20
# Vocabulary entries per block of the row loop and warps per row (not tuned on a GPU yet).
_BLOCK, _NUM_WARPS = 4096, 8


def _importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreted(kernel: Any) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def resolve_backend(backend: str, device: torch.device, divergence: str, teacher_form: str) -> str:
    """``"triton"`` or ``"torch"`` for a call on ``device`` with this divergence and teacher form.

    ``auto`` takes Triton on CUDA when it is importable and the case is served (see the module docstring);
    ``triton`` insists and raises a ValueError saying why where it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    served = teacher_form == "none" or (teacher_form == "dense" and divergence in KERNEL_DIVERGENCES)
    if backend == "torch" or (backend == "auto" and not (device.type == "cuda" and served and _importable())):
        return "torch"
    if not served:
        what = (
            "a sparse (cached) teacher"
            if teacher_form in ("sparse", "spread")
            else f"divergence {divergence!r}"
        )
        raise ValueError(
            f"backend='triton' (--loss-backend triton) does not serve {what}; use backend 'auto' or 'torch'"
        )
    if not _importable():
        raise ValueError("backend='triton' (--loss-backend triton) needs Triton: pip install triton")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1" or not _interpreted(_kernel()):
            raise ValueError(
                "backend='triton' on CPU tensors runs only under the Triton interpreter: set TRITON_INTERPRET=1 "
                "before Python starts (for tests), or use a CUDA device or backend 'torch'"
            )
    elif device.type != "cuda":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU ones under TRITON_INTERPRET=1), not {device}"
        )
    return "triton"


def triton_chunk_size(num_rows: int, vocab_size: int, itemsize: int, with_teacher: bool) -> int:
    """Rows per chunk on the Triton backend: the largest power of two whose student (and teacher) logits
    blocks fit in 256 MiB, clamped to [16, 4096] and to the rows rounded up to a power of two."""
    per_row = max(vocab_size, 1) * itemsize * (2 if with_teacher else 1)
    rows_in_budget = max(_LOGITS_BYTES // per_row, 1)
    size = min(max(1 << (rows_in_budget.bit_length() - 1), 16), 4096)
    return min(size, 1 << (max(num_rows, 1) - 1).bit_length())


def _kernel() -> Any:
    from todi.losses import triton_kernel

    return triton_kernel.distill_rows


def _log_weight(w: float) -> float:
    # log 0 as a finite stand-in: exp(x - 1e30) is exactly 0 and sums with it stay finite.
    return math.log(w) if w > 0 else -1.0e30


def run_chunk(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    targets: Tensor,
    scale: Tensor,
    divergence: str,
    params: dict[str, float],
    kd_rate: float,
    temperature: float,
    need_grad: bool,
    block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row CE, divergence and ToDi FKL share (float32 ``[rows]`` each) of one chunk; with
    ``need_grad`` ``student_logits`` then holds d((1 - kd_rate) CE + kd_rate D) * scale / d logits.

    ``block``: vocabulary entries per block of the row loop (tests use small ones to cross block edges).
    """
    rows, vocab = student_logits.shape
    out = torch.empty(3, rows, dtype=torch.float32, device=student_logits.device)
    if rows == 0:
        return out[0], out[1], out[2]
    for block_ in (student_logits, teacher_logits):
        if block_ is not None and block_.stride(-1) != 1:  # the kernel walks a row with unit steps
            raise ValueError(f"the row kernel needs rows of unit stride; got strides {block_.stride()}")
    code = 0 if teacher_logits is None else KERNEL_DIVERGENCES[divergence]
    skew = params.get("skew", 0.0)
    # skl mixes skew p + (1 - skew) q; srkl (1 - skew) p + skew q
    weights = (skew, 1.0 - skew) if divergence == "skl" else (1.0 - skew, skew)
    kernel = _kernel()
    block = block or min(_BLOCK, 1 << (vocab - 1).bit_length())
    options = {} if _interpreted(kernel) else {"num_warps": _NUM_WARPS}
    teacher = student_logits if teacher_logits is None else teacher_logits
    kernel[(rows,)](
        student_logits,
        teacher,
        targets,
        scale.to(device=student_logits.device, dtype=torch.float32),
        out,
        rows,
        vocab,
        student_logits.stride(0),
        teacher.stride(0),
        float(kd_rate),
        1.0 / temperature,
        float(params.get("beta", 1.0)),
        _log_weight(weights[0]),
        _log_weight(weights[1]),
        DIV=code,
        NEED_GRAD=need_grad,
        BLOCK=block,
        **options,
    )
    return out[0], out[1], out[2]
