"""Q/K/V split + rotary embeddings: the Triton kernels (kernels/triton_rope.py) against the reference, and the
reference against transformers' apply_rotary_pos_emb with autograd (the specification), on fresh random inputs
and edge cases: one token, grouped-query heads (fewer K/V heads), cos/sin shared over the batch ([1, S, D]) or
per row ([B, S, D]), head counts that are not a power of two."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from qlorakit.kernels import reference as ref
from qlorakit.kernels import triton_rope
from qlorakit.nn.rope import qkv_rope, qkv_rope_supported


def _inputs(b, s, heads, kv, d, per_row, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, s, (heads + 2 * kv) * d, generator=gen).to(dtype)
    angles = torch.rand(b if per_row else 1, s, d // 2, generator=gen) * 6.3
    angles = torch.cat([angles, angles], dim=-1)
    return qkv, angles.cos().to(dtype), angles.sin().to(dtype)


CASES = [(1, 1, 2, 1, 8, False), (2, 5, 4, 2, 16, True), (3, 4, 3, 1, 32, False), (1, 7, 6, 6, 8, True)]


@pytest.mark.parametrize("tokens", [None, 1], ids=["default-tile", "gpu-tile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, s, heads, kv, d, per_row", CASES)
def test_kernels_equal_the_reference(b, s, heads, kv, d, per_row, dtype, tokens):
    """tokens per program: the interpreter's default (several, with a partial last tile) and the GPU's one."""
    qkv, cos, sin = _inputs(b, s, heads, kv, d, per_row, dtype, seed=b * 100 + s)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -7)
    outs = triton_rope.qkv_rope_triton(qkv, cos, sin, heads, kv, d, tokens=tokens)
    for got, want in zip(outs, ref.qkv_rope_ref(qkv, cos, sin, heads, kv, d)):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got.float(), want.float(), **tol)
    grads = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(dtype) for i, o in enumerate(outs)]
    got = triton_rope.qkv_rope_backward_triton(*grads, cos, sin, tokens=tokens)
    torch.testing.assert_close(got.float(), ref.qkv_rope_backward_ref(*grads, cos, sin).float(), **tol)


@pytest.mark.parametrize("b, s, heads, kv, d, per_row", CASES[1:3])
def test_reference_is_transformers_rope_and_its_autograd(b, s, heads, kv, d, per_row, monkeypatch):
    monkeypatch.setenv("QLORAKIT_KERNELS", "reference")  # fp64: the reference's math (the kernels compute in fp32)
    qkv, cos, sin = _inputs(b, s, heads, kv, d, per_row, torch.float64, seed=7)
    qkv.requires_grad_(True)
    q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in qkv.split([heads * d, kv * d, kv * d], dim=-1))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    ours = qkv_rope(qkv, cos, sin, heads, kv, d)
    for a, b_ in zip(ours, (q, k, v)):
        torch.testing.assert_close(a, b_)
    grads = [torch.randn_like(t) for t in ours]
    expected = torch.autograd.grad((q, k, v), qkv, grads)[0]
    got = torch.autograd.grad(ours, qkv, grads)[0]
    torch.testing.assert_close(got, expected)


def test_supported_shapes():
    qkv, cos, _ = _inputs(2, 5, 4, 2, 16, True, torch.float32, 0)
    assert qkv_rope_supported(qkv, cos, 16)
    assert not qkv_rope_supported(qkv, cos, 12)  # head_dim not a power of two
    assert not qkv_rope_supported(qkv, cos[:, :4], 16)
    assert not qkv_rope_supported(qkv.view(10, -1), cos, 16)
