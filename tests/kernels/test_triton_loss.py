"""The fused linear + cross-entropy loss: the Triton cross_entropy_grad kernel against its reference, and
linear_cross_entropy_sum against F.cross_entropy of F.linear with autograd (its specification), on fresh random
inputs and edge cases: a vocabulary that is not a multiple of the kernel's block, one row, chunks that do not
divide the rows, a target at the last vocabulary index, a row whose logits are all equal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlorakit.kernels import reference as ref
from qlorakit.kernels import triton_loss
from qlorakit.train.loss import causal_lm_loss_sum, linear_cross_entropy_sum


@pytest.mark.parametrize("tile", [None, 1], ids=["default-tile", "gpu-tile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab", [(1, 17), (5, 4100), (19, 9000)])
def test_kernel_equals_the_reference(rows, vocab, dtype, tile):
    """rows per program: the interpreter's default (several, with a partial last tile) and the GPU's one."""
    gen = torch.Generator().manual_seed(rows + vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    logits[0] = 1.5  # all equal: the softmax is uniform
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[-1] = vocab - 1
    a, b = logits.clone(), logits.clone()
    loss = triton_loss.cross_entropy_grad_triton(a, targets, rows=tile)
    loss_ref = ref.cross_entropy_grad_ref(b, targets)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -14)
    torch.testing.assert_close(a.float(), b.float(), **tol)


def test_reference_is_cross_entropy_and_its_gradient():
    """The reference computes in fp32 (whatever the logits' dtype), float64 autograd is the truth: its loss
    (logsumexp of 50 N(0,1) logits, about 4-6) is within a few fp32 roundings, 2^-24 relative each, of it, its
    gradient (probabilities below 1) within a few 2^-24 absolute: rtol/atol 1e-6 cover both with margin."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, dtype=torch.float64, generator=gen).requires_grad_(True)
    t = torch.randint(0, 50, (6,), generator=gen)
    loss = F.cross_entropy(logits, t, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    work = logits.detach().clone()
    torch.testing.assert_close(ref.cross_entropy_grad_ref(work, t).double(), loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(work, grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 64])
def test_linear_cross_entropy_equals_autograd_of_the_composed_loss(chunk):
    gen = torch.Generator().manual_seed(chunk)
    h = torch.randn(10, 32, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    w = torch.randn(70, 32, generator=gen)
    t = torch.randint(0, 70, (10,), generator=gen)
    expected = F.cross_entropy(F.linear(h, w), t, reduction="sum")
    (g_expected,) = torch.autograd.grad(expected * 0.25, h)
    got = linear_cross_entropy_sum(h, w, t, chunk_tokens=chunk)
    (g,) = torch.autograd.grad(got * 0.25, h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_expected, rtol=1e-5, atol=1e-6)


def test_causal_lm_loss_takes_the_fused_path_only_for_a_frozen_head():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 16, generator=gen).requires_grad_(True)
    labels = torch.randint(0, 30, (2, 6), generator=gen)
    labels[0, 3] = -100
    w = torch.randn(30, 16, generator=gen)
    frozen = causal_lm_loss_sum(hidden, w, labels)
    assert frozen.grad_fn is not None and "LinearCrossEntropy" in type(frozen.grad_fn).__name__
    trained = causal_lm_loss_sum(hidden, w.clone().requires_grad_(True), labels)
    assert "LinearCrossEntropy" not in type(trained.grad_fn).__name__
    torch.testing.assert_close(frozen, trained, rtol=1e-6, atol=1e-5)
    (g1,) = torch.autograd.grad(frozen, hidden)
    (g2,) = torch.autograd.grad(trained, hidden)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must be frozen"):
        linear_cross_entropy_sum(hidden.view(-1, 16), w.requires_grad_(True), labels.view(-1).clamp(min=0))
