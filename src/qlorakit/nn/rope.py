"""Q/K/V split + rotary position embeddings as one autograd function over the dispatched `qkv_rope` kernels.

Specification: splitting a fused Q/K/V projection [B, S, (H + 2 Hkv) D] into attention's [B, heads, S, D]
tensors and transformers' apply_rotary_pos_emb on Q and K (x * cos + rotate_half(x) * sin). Saves only cos and
sin (the model's rotary buffers); backward writes the gradient of the fused projection in one pass.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels


class _QKVRopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                head_dim: int):
        q, k, v = kernels.call("qkv_rope", qkv, cos, sin, heads, kv_heads, head_dim)
        ctx.save_for_backward(cos, sin)
        ctx.heads, ctx.kv_heads = heads, kv_heads
        return q, k, v

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor | None, dk: torch.Tensor | None, dv: torch.Tensor | None):
        cos, sin = ctx.saved_tensors
        ref = next(g for g in (dq, dk, dv) if g is not None)
        b, s = ref.shape[0], ref.shape[2]
        d = ref.shape[3]
        dq = dq if dq is not None else ref.new_zeros((b, ctx.heads, s, d))
        dk = dk if dk is not None else ref.new_zeros((b, ctx.kv_heads, s, d))
        dv = dv if dv is not None else ref.new_zeros((b, ctx.kv_heads, s, d))
        return kernels.call("qkv_rope_backward", dq, dk, dv, cos, sin), None, None, None, None, None


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, S, (heads + 2 kv_heads) head_dim]; cos, sin [1 or B, S, head_dim] (no gradient); returns q
    [B, heads, S, D] and k [B, kv_heads, S, D] with rotary embeddings, and v [B, kv_heads, S, D], contiguous."""
    return _QKVRopeFn.apply(qkv, cos, sin, heads, kv_heads, head_dim)


def qkv_rope_supported(qkv: torch.Tensor, cos: torch.Tensor, head_dim: int) -> bool:
    """Whether qkv_rope takes these shapes: [B, S, N] rows contiguous, cos [1 or B, S, D] contiguous, D a power
    of two (the kernels' tile)."""
    return (qkv.dim() == 3 and qkv.stride(-1) == 1 and cos.dim() == 3 and cos.is_contiguous()
            and cos.shape[-2:] == (qkv.shape[1], head_dim) and cos.shape[0] in (1, qkv.shape[0])
            and head_dim >= 2 and head_dim & (head_dim - 1) == 0)
