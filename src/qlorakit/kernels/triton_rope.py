"""Triton kernels that split a fused Q/K/V projection into attention's [B, heads, S, D] tensors and apply rotary
position embeddings to Q and K on the way (forward), and the reverse for the gradients (backward).
Specification: reference.qkv_rope_ref / qkv_rope_backward_ref, which compute what transformers'
apply_rotary_pos_emb and its autograd compute, rounding where its bf16 ops round.

One program per token on a GPU (several under the interpreter: triton_block.rows_per_program): it reads the
token's whole Q/K/V row once and writes each head's row where attention wants it. Launched with
enable_fp_fusion=False: with fusion on, the compiler narrows "round both products to bf16, add, round" to bf16
operations and then contracts one product into an FMA, dropping a rounding torch makes (found on an H200 by
benchmarks/block_check.py: 23% of the forward's elements differed). The torch ops they replace run on strided views of the Q/K/V buffer (non-vectorised kernels) and make
about six passes forward and six backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import register
from .triton_block import rows_per_program


@triton.jit
def _tile(T, S, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, TOKENS: tl.constexpr):
    """This program's [TOKENS, HP, D] tile: tokens x (Q, K, V heads, padded to a power of two) x head_dim, as
    token t (batch b, position s), head h, column d, the masks of Q, K and V heads, and K's / V's head index."""
    t = (tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS))[:, None, None]
    h = tl.arange(0, HP)[None, :, None]
    d = tl.arange(0, D)[None, None, :]
    hk, hv = h - HQ, h - HQ - HKV
    in_t = t < T
    is_q, is_k, is_v = (h < HQ) & in_t, (hk >= 0) & (hk < HKV) & in_t, (hv >= 0) & (hv < HKV) & in_t
    return t, t // S, t % S, h, d, is_q, is_k, is_v, hk, hv


@triton.jit
def _qkv_rope_fwd_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, T, S, row_stride, cos_batch_stride,
                         HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HP: tl.constexpr,
                         TOKENS: tl.constexpr):
    t, b, s, h, d, is_q, is_k, is_v, hk, hv = _tile(T, S, HQ, HKV, D, HP, TOKENS)
    live = is_q | is_k | is_v
    row = qkv_ptr + t * row_stride + h * D
    x = tl.load(row + d, mask=live, other=0.0).to(tl.float32)
    x_other = tl.load(row + (d + D // 2) % D, mask=live, other=0.0).to(tl.float32)
    rot = tl.where(d < D // 2, -x_other, x_other)  # rotate_half: cat(-x2, x1)
    c = tl.load(cos_ptr + b * cos_batch_stride + s * D + d, mask=t < T, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + b * cos_batch_stride + s * D + d, mask=t < T, other=0.0).to(tl.float32)
    dt = q_ptr.dtype.element_ty
    y = ((x * c).to(dt).to(tl.float32) + (rot * sn).to(dt).to(tl.float32)).to(dt)
    tl.store(q_ptr + ((b * HQ + h) * S + s) * D + d, y, mask=is_q)
    tl.store(k_ptr + ((b * HKV + hk) * S + s) * D + d, y, mask=is_k)
    tl.store(v_ptr + ((b * HKV + hv) * S + s) * D + d, x.to(dt), mask=is_v)


@triton.jit
def _qkv_rope_bwd_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqkv_ptr, T, S, row_stride, cos_batch_stride,
                         HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HP: tl.constexpr,
                         TOKENS: tl.constexpr):
    t, b, s, h, d, is_q, is_k, is_v, hk, hv = _tile(T, S, HQ, HKV, D, HP, TOKENS)
    in_t = t < T
    d_other = (d + D // 2) % D
    q_row = dq_ptr + ((b * HQ + h) * S + s) * D
    k_row = dk_ptr + ((b * HKV + hk) * S + s) * D
    v_row = dv_ptr + ((b * HKV + hv) * S + s) * D
    g = (tl.load(q_row + d, mask=is_q, other=0.0).to(tl.float32)
         + tl.load(k_row + d, mask=is_k, other=0.0).to(tl.float32)
         + tl.load(v_row + d, mask=is_v, other=0.0).to(tl.float32))
    g_other = (tl.load(q_row + d_other, mask=is_q, other=0.0).to(tl.float32)
               + tl.load(k_row + d_other, mask=is_k, other=0.0).to(tl.float32))
    c = tl.load(cos_ptr + b * cos_batch_stride + s * D + d, mask=in_t, other=0.0).to(tl.float32)
    sn_other = tl.load(sin_ptr + b * cos_batch_stride + s * D + d_other, mask=in_t, other=0.0).to(tl.float32)
    dt = dqkv_ptr.dtype.element_ty
    d_rot_other = (g_other * sn_other).to(dt).to(tl.float32)  # the gradient of rotate_half(x) at the partner index
    back = tl.where(d < D // 2, d_rot_other, -d_rot_other)  # rotate_half transposed: cat(y2, -y1)
    dx = ((g * c).to(dt).to(tl.float32) + back).to(dt)
    dx = tl.where(is_v, g.to(dt), dx)
    tl.store(dqkv_ptr + t * row_stride + h * D + d, dx, mask=is_q | is_k | is_v)


def _cos_batch_stride(cos: torch.Tensor, batch: int, seq: int, head_dim: int) -> int:
    if cos.shape[-2:] != (seq, head_dim) or cos.shape[0] not in (1, batch) or not cos.is_contiguous():
        raise ValueError(f"qkv_rope: cos/sin must be contiguous [1 or {batch}, {seq}, {head_dim}], got "
                         f"{list(cos.shape)}")
    return 0 if cos.shape[0] == 1 else seq * head_dim


@register("qkv_rope", "triton")
def qkv_rope_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                    head_dim: int, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, S, (heads + 2 kv_heads) head_dim] (rows contiguous) -> q [B, heads, S, D], k and v [B, kv_heads, S,
    D], contiguous, with RoPE on q and k; see reference.qkv_rope_ref."""
    b, s, _ = qkv.shape
    cbs = _cos_batch_stride(cos, b, s, head_dim)
    q = torch.empty((b, heads, s, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((b, kv_heads, s, head_dim), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    if b * s:
        n = tokens or rows_per_program()
        _qkv_rope_fwd_kernel[(triton.cdiv(b * s, n),)](
            qkv, cos, sin, q, k, v, b * s, s, qkv.stride(1), cbs, HQ=heads, HKV=kv_heads, D=head_dim,
            HP=triton.next_power_of_2(heads + 2 * kv_heads), TOKENS=n, num_warps=8, enable_fp_fusion=False)
    return q, k, v


@register("qkv_rope_backward", "triton")
def qkv_rope_backward_triton(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
    """d qkv [B, S, (heads + 2 kv_heads) D] from the gradients of q, k, v; see reference.qkv_rope_backward_ref."""
    b, heads, s, head_dim = dq.shape
    kv_heads = dk.shape[1]
    cbs = _cos_batch_stride(cos, b, s, head_dim)
    dqkv = torch.empty((b, s, (heads + 2 * kv_heads) * head_dim), dtype=dq.dtype, device=dq.device)
    if b * s:
        n = tokens or rows_per_program()
        _qkv_rope_bwd_kernel[(triton.cdiv(b * s, n),)](
            dq.contiguous(), dk.contiguous(), dv.contiguous(), cos, sin, dqkv, b * s, s, dqkv.stride(1), cbs,
            HQ=heads, HKV=kv_heads, D=head_dim, HP=triton.next_power_of_2(heads + 2 * kv_heads), TOKENS=n,
            num_warps=8, enable_fp_fusion=False)
    return dqkv
