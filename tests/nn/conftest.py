"""Shared fixtures for the nn tests: fixed-seed dense layers to quantize, one intra-op thread."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run thousands of tiny ops (gradcheck alone: thousands of small float64 matmuls); handing each
    to a second thread costs more than the op itself (10x on a busy machine), so they run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_linear() -> Callable[..., nn.Linear]:
    """make_linear(in_features, out_features, bias=True, dtype=fp32, seed=0): an nn.Linear with fixed, fresh
    random weights (default nn.Linear initialisation under `seed`, independent of the global RNG)."""

    def make(
        in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> nn.Linear:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
            if bias:
                nn.init.normal_(linear.bias)  # nonzero, not tiny: a bias mix-up must show in the output
        return linear

    return make
