"""Comparing a dispatched result with what the PyTorch reference computes.

On the reference backend the two are the same computation and must be bit-identical. On the Triton backend
under the CPU interpreter two things legitimately differ: the interpreter truncates fp32 -> bf16/fp16 casts
(GPUs round to nearest even), and the 1-16-row kernels sum in a different order than torch's matmul. There the
check allows two units in the last place of the output dtype (fp32: 1e-5 relative).
"""

from __future__ import annotations

import os

import torch

_TOL = {torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3), torch.float32: (1e-5, 1e-5),
        torch.float64: (1e-12, 1e-12)}


def assert_same_as_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if os.environ.get("QLORAKIT_KERNELS", "reference") == "reference":
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert torch.equal(actual, expected), "the reference path must be bit-identical"
        return
    rtol, atol_rel = _TOL[expected.dtype]
    atol = atol_rel * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
