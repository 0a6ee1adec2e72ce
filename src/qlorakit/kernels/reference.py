"""Reference implementations of the dispatched operations, in plain PyTorch (the specification)."""

from __future__ import annotations

import torch

from ..quant.state import QuantState, dequantize_4bit, quantize_4bit
from .dispatch import register


@register("dequantize_4bit", "reference")
def dequantize_ref(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 [(N*K+1)//2, 1] -> `dtype` [N, K]."""
    return dequantize_4bit(packed, state, dtype)


@register("linear_4bit", "reference")
def linear_4bit_ref(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Y = X W^T (+ b). x: [..., K] in the compute dtype; W is [N, K] in 4 bits; returns [..., N] in x.dtype."""
    w = dequantize_4bit(packed, state, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@register("linear_4bit_grad_input", "reference")
def linear_4bit_grad_input_ref(grad_y: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """dX = dY W. grad_y: [..., N]; returns [..., K] in grad_y.dtype."""
    w = dequantize_4bit(packed, state, grad_y.dtype)
    return grad_y @ w


@register("linear_4bit_cat", "reference")
def linear_4bit_cat_ref(x: torch.Tensor, packed: list[torch.Tensor], states: list[QuantState]) -> torch.Tensor:
    """Y = X [W_0; W_1; ...]^T: several 4-bit weights [N_i, K] on one input. x [M, K]; returns [M, sum N_i]."""
    w = torch.cat([dequantize_4bit(p, s, x.dtype) for p, s in zip(packed, states)])
    return x @ w.t()


@register("linear_4bit_cat_grad_input", "reference")
def linear_4bit_cat_grad_input_ref(grad_y: torch.Tensor, packed: list[torch.Tensor],
                                   states: list[QuantState]) -> torch.Tensor:
    """dX = dY [W_0; W_1; ...]. grad_y [M, sum N_i]; returns [M, K] in grad_y.dtype."""
    w = torch.cat([dequantize_4bit(p, s, grad_y.dtype) for p, s in zip(packed, states)])
    return grad_y @ w


@register("quantize_4bit", "reference")
def quantize_ref(
    x: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool
) -> tuple[torch.Tensor, QuantState]:
    return quantize_4bit(x, blocksize, quant_type, double_quant)


# --- the elementwise parts of a Llama block (fused on the GPU by kernels/triton_block.py) ----------------------

@register("rms_norm", "reference")
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for x [M, H]: rstd = rsqrt(mean(fp32(x)^2) + eps) [M] fp32 and y = weight * x.dtype(fp32(x) *
    rstd), as transformers' LlamaRMSNorm computes it (y in the promoted dtype of weight and x)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return weight * (xf * rstd[:, None]).to(x.dtype), rstd


@register("rms_norm_backward", "reference")
def rms_norm_backward_ref(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor) -> torch.Tensor:
    """dx [M, H] in x.dtype for y = rms_norm(x, weight) (weight frozen): with n = fp32(x) rstd and
    dn = fp32(dy * weight), dx = rstd dn - rstd^3 / H * fp32(x) * sum(dn * fp32(x))."""
    xf = x.float()
    dn = (dy * weight).float()
    r = rstd[:, None]
    dot = (dn * xf).sum(-1, keepdim=True)
    return (r * dn - r.pow(3) * xf * (dot / x.shape[-1])).to(x.dtype)


@register("swiglu", "reference")
def swiglu_ref(gu: torch.Tensor) -> torch.Tensor:
    """gu [M, 2I] = [gate | up] -> silu(gate) * up [M, I] in gu's dtype (each op rounded as torch rounds it)."""
    g, u = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


@register("swiglu_backward", "reference")
def swiglu_backward_ref(d_act: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
    """[d gate | d up] [M, 2I] of silu(gate) * up for d_act [M, I]: d up = d_act * silu(gate) and d gate =
    d_act * up * sig(gate) * (1 + gate (1 - sig(gate))), in fp32 rounded once to gu's dtype."""
    g, u = gu.chunk(2, dim=-1)
    gf, da = g.float(), d_act.float()
    sig = torch.sigmoid(gf)
    out = torch.empty_like(gu)
    dg, du = out.chunk(2, dim=-1)
    du.copy_(da * torch.nn.functional.silu(g).float())
    dg.copy_(da * u.float() * sig * (1.0 + gf * (1.0 - sig)))
    return out


@register("cross_entropy_grad", "reference")
def cross_entropy_grad_ref(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row of logits [M, V]: the fp32 loss logsumexp(fp32 row) - row[target], returned as [M]; the row is
    overwritten IN PLACE by its gradient softmax(fp32 row) - onehot(target), rounded to the logits' dtype."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    loss = lse - lf.gather(1, targets[:, None]).squeeze(1)
    grad = torch.exp(lf.sub_(lse[:, None]))
    grad[torch.arange(len(targets), device=logits.device), targets] -= 1.0
    logits.copy_(grad)
    return loss


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@register("qkv_rope", "reference")
def qkv_rope_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, S, (heads + 2 kv_heads) D] -> (q [B, heads, S, D], k, v [B, kv_heads, S, D]), contiguous; q and
    k get rotary embeddings with cos/sin [1 or B, S, D] as transformers' apply_rotary_pos_emb applies them:
    x * cos + rotate_half(x) * sin, each op in x's dtype."""
    b, s, _ = qkv.shape
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(b, s, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
    return ((q * c + _rotate_half(q) * sn).contiguous(), (k * c + _rotate_half(k) * sn).contiguous(),
            v.contiguous())


@register("qkv_rope_backward", "reference")
def qkv_rope_backward_ref(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> torch.Tensor:
    """d qkv [B, S, (heads + 2 kv_heads) D] of qkv_rope_ref, as autograd computes it: d x = d y * cos +
    rotate_half^T(d y * sin) with rotate_half^T(z) = cat(z2, -z1), each op in the gradient's dtype."""
    c, sn = cos.unsqueeze(1), sin.unsqueeze(1)

    def back(dy: torch.Tensor) -> torch.Tensor:
        z = dy * sn
        half = z.shape[-1] // 2
        return dy * c + torch.cat((z[..., half:], -z[..., :half]), dim=-1)

    b, _, s, _ = dq.shape
    return torch.cat([t.transpose(1, 2).reshape(b, s, -1) for t in (back(dq), back(dk), dv)], dim=-1)
