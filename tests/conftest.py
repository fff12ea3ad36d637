"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Without CUDA, Triton runs its kernels under its CPU interpreter (tests/test_triton.py), which Triton
# decides once, at its import: torch._dynamo imports it as soon as transformers loads, long before that
# module is collected, so the switch is set here, for the whole process. It only changes what Triton does;
# the fused loss stays on its torch backend on the CPU unless a test asks for backend="triton". With CUDA
# the compiled kernel is tested (tests/test_cuda.py) and the switch stays off.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors: with several intra-op threads on a busy 2-core machine every op pays an OpenMP
    hand-off (~2-16 ms for a 3x7 log_softmax, vs ~2 us on one thread). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_compile_override(monkeypatch):
    """TODI_COMPILE unset: it would override the compile argument, and these tests choose the path explicitly."""
    monkeypatch.delenv("TODI_COMPILE", raising=False)


@pytest.fixture(scope="module")
def gpt2():
    """The GPT-2 tokenizer from the shared folder (tiny.gpt2_tokenizer); skips the test where it is missing."""
    import tiny

    if not (tiny.GPT2_DIR / "tokenizer.json").is_file():
        pytest.skip(f"GPT-2 tokenizer not found at {tiny.GPT2_DIR} (set TODI_DATA)")
    return tiny.gpt2_tokenizer()


@pytest.fixture
def fresh_accelerate_state(monkeypatch):
    """accelerate keeps process-wide singletons; each in-process run must start from a clean slate (and
    without torch.compile of the fused loss, which costs more than it saves on tiny runs)."""
    monkeypatch.setenv("TODI_COMPILE", "0")
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
