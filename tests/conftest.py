"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors: with several intra-op threads on a busy 2-core machine every op pays an OpenMP
    hand-off (~2-16 ms for a 3x7 log_softmax, vs ~2 us on one thread). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
