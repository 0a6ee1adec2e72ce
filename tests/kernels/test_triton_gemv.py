"""The 4-bit GEMV and the fused small-M kernel against an fp64 product of the same weight.

Specification: Y = X W^T (+ b) for X [M, K] in bf16 / fp16 / fp32, W [N, K] 4-bit, Y in X's dtype, computed from
the packed bytes with fp32 accumulation. The fused kernel multiplies the very W the dequantizer produces (rounded
to X's dtype once), so its reference is the fp64 product of `dequantize_4bit_triton(.., X.dtype)`; the GEMV keeps
W in fp32, so its reference is the fp64 product of the fp32 W.

Tolerance, |Y - ref| / |ref| (Frobenius): the output's own rounding dominates: bf16 2^-8 relative per value (the
interpreter truncates, up to 2^-7) -> 1e-2; fp16 2^-11 -> 2e-3; fp32 accumulation of fp32 products over
K <= 8192 terms -> 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from qlorakit.errors import QlorakitError
from qlorakit.kernels.triton_dequant import dequantize_4bit_triton
from qlorakit.kernels.triton_gemv import GemmConfig, gemv_4bit, matmul_4bit_small
from qlorakit.quant.state import dequantize_4bit, quantize_4bit

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref).norm() / ref.norm()).item()


def quantized(n_out: int, k: int, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_4bit(torch.randn(n_out, k, generator=gen), blocksize, quant_type, double_quant)


def inputs(rows: int, k: int, n_out: int, dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=gen).to(dtype), torch.randn(n_out, generator=gen).to(dtype)


# (N, K, blocksize, quant_type, double_quant): aligned K (chunks inside blocks) and K that is not a multiple of the
# blocksize, so that blocks straddle rows (the per-element kernel); odd N everywhere.
SHAPES = [
    pytest.param(33, 256, 64, "nf4", True, id="aligned-33x256-nf4-nested"),
    pytest.param(19, 4096, 4096, "fp4", False, id="aligned-blocksize-4096-fp4"),
    pytest.param(17, 96, 64, "nf4", True, id="K96-blocks-straddle-rows"),
    pytest.param(7, 33, 32, "fp4", True, id="odd-K33"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_out, k, blocksize, quant_type, double_quant", SHAPES)
def test_gemv_one_row(n_out, k, blocksize, quant_type, double_quant, dtype):
    packed, state = quantized(n_out, k, blocksize, quant_type, double_quant)
    w = dequantize_4bit(packed, state, torch.float32).double()
    x, b = inputs(1, k, n_out, dtype)
    y = gemv_4bit(x, packed, state, b)
    assert y.shape == (1, n_out) and y.dtype == dtype
    assert rel_err(y, x.double() @ w.T + b.double()) <= TOL[dtype]
    assert rel_err(gemv_4bit(x, packed, state), x.double() @ w.T) <= TOL[dtype]




@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [2, 3, 16])
@pytest.mark.parametrize("n_out, k, blocksize, quant_type, double_quant", SHAPES)
def test_fused_few_rows(n_out, k, blocksize, quant_type, double_quant, rows, dtype):
    packed, state = quantized(n_out, k, blocksize, quant_type, double_quant, seed=rows)
    aligned = k % min(blocksize, GemmConfig().k_tile) == 0
    # aligned: the kernel's W is the dequantizer's W in X's dtype; otherwise (per-element kernel) it stays fp32
    w = dequantize_4bit_triton(packed, state, dtype if aligned else torch.float32).double()
    x, b = inputs(rows, k, n_out, dtype, seed=rows)
    y = matmul_4bit_small(x, packed, state, b)
    assert y.shape == (rows, n_out) and y.dtype == dtype
    assert rel_err(y, x.double() @ w.T + b.double()) <= TOL[dtype]


def test_fused_kernel_takes_any_number_of_rows_when_aligned():
    packed, state = quantized(40, 128)
    w = dequantize_4bit_triton(packed, state, torch.float32).double()
    x, _ = inputs(37, 128, 40, torch.float32)
    for cfg in (GemmConfig(), GemmConfig(block_m=32, block_n=16, k_tile=64)):
        assert rel_err(matmul_4bit_small(x, packed, state, config=cfg), x.double() @ w.T) <= TOL[torch.float32]


def test_non_contiguous_rows_and_a_strided_batch():
    packed, state = quantized(24, 128)
    w = dequantize_4bit_triton(packed, state, torch.bfloat16).double()
    x = inputs(8, 256, 24, torch.bfloat16)[0][:, ::2]  # every other column: not a contiguous row
    assert rel_err(matmul_4bit_small(x, packed, state), x.double() @ w.T) <= TOL[torch.bfloat16]
    x1 = inputs(3, 128, 24, torch.bfloat16)[0][1:2]  # one row at an offset into its storage
    w32 = dequantize_4bit(packed, state, torch.float32).double()
    assert rel_err(gemv_4bit(x1, packed, state), x1.double() @ w32.T) <= TOL[torch.bfloat16]


def test_shape_and_dtype_errors_are_clear():
    packed, state = quantized(8, 64)
    with pytest.raises(QlorakitError, match=r"x must be \[rows, 64\], got \[1, 32\]"):
        gemv_4bit(torch.randn(1, 32), packed, state)
    with pytest.raises(QlorakitError, match="x dtype torch.float64 not supported"):
        gemv_4bit(torch.randn(1, 64, dtype=torch.float64), packed, state)
    with pytest.raises(QlorakitError, match="gemv_4bit takes one row, got 2"):
        gemv_4bit(torch.randn(2, 64), packed, state)
    unaligned = quantized(8, 96)
    with pytest.raises(QlorakitError, match="K=96 is not a multiple of 64 and M=17 > 16"):
        matmul_4bit_small(torch.randn(17, 96), *unaligned)
