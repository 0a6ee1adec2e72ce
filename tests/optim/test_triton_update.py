"""The fused Triton update against the plain-PyTorch reference, on small tensors under TRITON_INTERPRET=1.

Exact on everything the kernel computes in fp32: 8-bit codes, absmax, fp32 moments, fp32 parameters. For bf16
parameters the interpreter's fp32 -> bf16 conversion truncates where CUDA (and torch) round to nearest even, so
the stored parameter may differ by one bf16 unit in the last place here; the moments, computed before that
conversion, are still exact. benchmarks/optim.py checks bit equality on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from qlorakit.optim import AdamW
from qlorakit.optim.reference import StepConstants, UpdateItem, adamw_update_8bit, adamw_update_32bit
from qlorakit.optim.state_8bit import quantize_state, state_maps
from qlorakit.optim.triton_update import kernel_accepts, launch_updates

CPU = torch.device("cpu")
# Sizes: an exact multiple of a program's 1024 elements, a short tail block, less than one block, one element.
NUMELS = (2048, 1300, 100, 1)


def _item(n: int, quantized: bool, dtype: torch.dtype, g: torch.Generator, c: StepConstants,
          block: int = 256) -> UpdateItem:
    p = torch.randn(n, generator=g).to(dtype)
    grad = (torch.randn(n, generator=g) * 0.01).to(dtype)
    m = torch.randn(n, generator=g) * 1e-3
    v = torch.rand(n, generator=g) * 1e-5
    if n > 600:
        m[256:512] = 0  # an all-zero block of the first moment
        v[256:512] = 0
        grad[256:300] = 0
    if quantized:
        maps = state_maps(CPU)
        qm, am = quantize_state(m, maps.signed, maps.signed_mid, block)
        qv, av = quantize_state(v, maps.unsigned, maps.unsigned_mid, block)
        states = (qm, qv, am, av)
    else:
        states = (m, v)
    return UpdateItem(p, grad, states, c, quantized, block)


def _reference(it: UpdateItem) -> None:
    if it.quantized:
        qm, qv, am, av = it.states
        adamw_update_8bit(it.param, it.grad, qm, am, qv, av, it.constants, it.block_size)
    else:
        adamw_update_32bit(it.param, it.grad, it.states[0], it.states[1], it.constants)


def _clone(it: UpdateItem) -> UpdateItem:
    return UpdateItem(it.param.clone(), it.grad, tuple(s.clone() for s in it.states), it.constants, it.quantized,
                      it.block_size)


@pytest.mark.parametrize("quantized", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_reference(quantized, dtype):
    g = torch.Generator().manual_seed(0)
    consts = [StepConstants.for_step(1e-3, (0.9, 0.999), 1e-8, wd, step) for wd, step in
              ((0.0, 1), (0.1, 7), (0.01, 1000), (0.0, 3))]
    items = [_item(n, quantized, dtype, g, c) for n, c in zip(NUMELS, consts)]
    expected = [_clone(it) for it in items]
    for it in expected:
        _reference(it)
    launch_updates(items, {})  # all four tensors, even and uneven, in one call
    for got, want in zip(items, expected):
        for s_got, s_want in zip(got.states, want.states):
            assert torch.equal(s_got, s_want)
        if dtype == torch.float32:
            assert torch.equal(got.param, want.param)
        else:
            ulps = (got.param.view(torch.int16).int() - want.param.view(torch.int16).int()).abs()
            assert int(ulps.max()) <= 1


@pytest.mark.parametrize("block", [64, 2048])
def test_kernel_matches_reference_for_other_block_sizes(block):
    g = torch.Generator().manual_seed(1)
    c = StepConstants.for_step(1e-3, (0.9, 0.999), 1e-8, 0.0, 2)
    items = [_item(n, True, torch.float32, g, c, block) for n in (4096, 1000)]
    expected = [_clone(it) for it in items]
    for it in expected:
        _reference(it)
    launch_updates(items, {})
    for got, want in zip(items, expected):
        assert all(torch.equal(a, b) for a, b in zip((got.param, *got.states), (want.param, *want.states)))


def test_kernel_takes_only_contiguous_supported_tensors():
    c = StepConstants.for_step(1e-3, (0.9, 0.999), 1e-8, 0.0, 1)
    p = torch.randn(64, 64)
    ok = UpdateItem(p, torch.randn(64, 64), (torch.zeros(4096), torch.zeros(4096)), c, False, 256)
    assert kernel_accepts(ok)
    assert not kernel_accepts(UpdateItem(p.T, torch.randn(64, 64), ok.states, c, False, 256))
    assert not kernel_accepts(UpdateItem(p.double(), torch.randn(64, 64).double(), ok.states, c, False, 256))


def test_optimizer_on_the_kernel_equals_optimizer_on_the_reference(monkeypatch):
    g = torch.Generator().manual_seed(3)
    shapes = [(40, 128), (700,), (9, 10)]
    a = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = AdamW(a, lr=1e-2, weight_decay=0.01, state_bits=8, min_8bit_size=512)
    opt_b = AdamW(b, lr=1e-2, weight_decay=0.01, state_bits=8, min_8bit_size=512)
    for _ in range(3):
        for pa, pb in zip(a, b):
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        monkeypatch.setenv("QLORAKIT_KERNELS", "triton")
        opt_a.step()
        monkeypatch.setenv("QLORAKIT_KERNELS", "reference")
        opt_b.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        for key, value in opt_a.state[pa].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b.state[pb][key])), key
