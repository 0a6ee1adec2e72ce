"""Fixtures for the quantization tests: bitsandbytes (the other library) runs eagerly on the CPU.

bitsandbytes wraps its plain-PyTorch dequantizer (taken on the CPU when the last dimension is odd) in
`torch.compile(dynamic=False)`: each new shape and dtype recompiles, 10+ seconds apiece on two cores, and after
eight recompiles it runs eagerly anyway. Compiled or eager, it computes the same thing (the fp32 product
code[q] * absmax, rounded once to the output dtype), so these tests run it eagerly to stay fast.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _bitsandbytes_eager():
    with torch._dynamo.config.patch(disable=True):
        yield
