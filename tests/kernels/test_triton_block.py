"""Triton RMSNorm / SwiGLU kernels (kernels/triton_block.py) and the stacked 4-bit matmuls (linear_4bit_cat*)
against their PyTorch references, on fresh random inputs and named edge cases: a row length that is not a power
of two, one row, an intermediate size that is not a multiple of the block, fp32 and bf16.

Under the Triton interpreter fp32 -> bf16 casts truncate where a GPU rounds, so bf16 outputs are compared within
two bf16 ulps; fp32 outputs within fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from qlorakit.kernels import reference as ref
from qlorakit.kernels import triton_block, triton_matmul
from qlorakit.quant.state import quantize_4bit

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2 ** -6, atol=2e-3)}


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


TILES = pytest.mark.parametrize("tile", [None, 1], ids=["default-tile", "gpu-tile"])


@TILES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, h", [(1, 64), (7, 96), (19, 1000)])
def test_rms_norm_forward_and_backward(rows, h, dtype, tile):
    """rows per program: the interpreter's default (several, with a partial last tile) and the GPU's one."""
    seed = rows * h
    x, w = _rand(rows, h, dtype=dtype, seed=seed) * 3, _rand(h, dtype=dtype, seed=seed + 1)
    y, rstd = triton_block.rms_norm_triton(x, w, 1e-5, rows=tile)
    y_ref, rstd_ref = ref.rms_norm_ref(x, w, 1e-5)
    torch.testing.assert_close(rstd, rstd_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOL[dtype])
    dy = _rand(rows, h, dtype=dtype, seed=seed + 2)
    dx = triton_block.rms_norm_backward_triton(dy, x, w, rstd_ref, rows=tile)
    dx_ref = ref.rms_norm_backward_ref(dy, x, w, rstd_ref)
    assert dx.dtype == x.dtype
    torch.testing.assert_close(dx.float(), dx_ref.float(), **TOL[dtype])


def test_rms_norm_reference_backward_is_autograd_of_the_reference():
    x = torch.randn(4, 40, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, dtype=torch.float64)
    y, rstd = ref.rms_norm_ref(x, w, 1e-6)
    dy = torch.randn(4, 40, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(ref.rms_norm_backward_ref(dy, x.detach(), w, rstd.detach()), dx)


@TILES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, inter", [(1, 8), (5, 1500), (18, 1024)])
def test_swiglu_forward_and_backward(rows, inter, dtype, tile):
    gu = _rand(rows, 2 * inter, dtype=dtype, seed=inter) * 4
    torch.testing.assert_close(triton_block.swiglu_triton(gu, rows=tile).float(), ref.swiglu_ref(gu).float(),
                               **TOL[dtype])
    da = _rand(rows, inter, dtype=dtype, seed=inter + 1)
    out = triton_block.swiglu_backward_triton(da, gu, rows=tile)
    torch.testing.assert_close(out.float(), ref.swiglu_backward_ref(da, gu).float(), **TOL[dtype])


@pytest.mark.parametrize("seed", range(4))
def test_swiglu_reference_backward_is_autograd_of_the_reference(seed):
    """The reference evaluates its closed form in fp32 (even for fp64 inputs); autograd of swiglu_ref in fp64 is
    the truth. Each fp32 operation adds a relative error of at most eps/2, so an element may be off by a few eps
    times the magnitudes of the terms it is built from, including the rounding of g itself, which moves sig(g)
    and g (1 - sig(g)): hence the per-element bound, not one tolerance for all (where the gate factor
    1 + g (1 - sig(g)) crosses zero, the relative error is unbounded while the absolute one stays tiny)."""
    gen = torch.Generator().manual_seed(seed)
    gu = torch.randn(3, 20, dtype=torch.float64, generator=gen).requires_grad_()
    da = torch.randn(3, 10, dtype=torch.float64, generator=gen)
    (d,) = torch.autograd.grad(ref.swiglu_ref(gu), gu, da)
    got = ref.swiglu_backward_ref(da, gu.detach())
    g, u = gu.detach().chunk(2, dim=-1)
    sig = torch.sigmoid(g)
    eps = torch.finfo(torch.float32).eps
    # |terms| of d gate = da * u * sig * (1 + g (1 - sig)), and |d(...)/dg| * |g| for g's own rounding
    gate_terms = (da * u).abs() * (sig * (1 + g.abs() * (1 - sig)) + g.abs() * sig * (1 - sig) * (2 + g.abs()))
    up_terms = (da * g).abs() * sig * (1 + g.abs())
    bound = 8 * eps * torch.cat([gate_terms, up_terms], dim=-1)
    assert ((got - d).abs() <= bound).all(), float(((got - d).abs() / bound).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_matmuls_equal_the_reference(dtype):
    gen = torch.Generator().manual_seed(9)
    qs = [quantize_4bit(torch.randn(n, 96, generator=gen), 64, "nf4", True) for n in (40, 8, 9)]
    packed, states = [q[0] for q in qs], [q[1] for q in qs]
    # fp32: the same dequantized W, the same matmul; bf16: W's elements may differ by the interpreter's
    # truncation (one ulp), so the products are compared by relative norm
    bound = 1e-6 if dtype == torch.float32 else 1e-2
    x = torch.randn(20, 96, generator=gen).to(dtype)
    y, y_ref = triton_matmul.linear_4bit_cat_triton(x, packed, states), ref.linear_4bit_cat_ref(x, packed, states)
    assert y.shape == (20, 57) and y.dtype == dtype
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()) < bound
    dy = torch.randn(20, 57, generator=gen).to(dtype)
    dx = triton_matmul.linear_4bit_cat_grad_input_triton(dy, packed, states)
    dx_ref = ref.linear_4bit_cat_grad_input_ref(dy, packed, states)
    assert dx.shape == (20, 96) and ((dx.float() - dx_ref.float()).norm() / dx_ref.float().norm()) < bound
    with pytest.raises(ValueError, match="in_features differ"):
        triton_matmul.linear_4bit_cat_triton(x, [packed[0], quantize_4bit(torch.randn(4, 64), 64, "nf4", True)[0]],
                                             [states[0], quantize_4bit(torch.randn(4, 64), 64, "nf4", True)[1]])
