"""The optimizer tests update many small tensors; one thread avoids OpenMP hand-off latency that dominates at
these sizes on a busy two-core CI machine."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
