"""RMSNorm with a frozen weight as one autograd function over the dispatched `rms_norm` kernels.

Specification: transformers' LlamaRMSNorm (y = weight * x.dtype(fp32(x) * rsqrt(mean(fp32(x)^2) + eps))), with
the weight frozen as it is in QLoRA. It saves x and the fp32 rstd per row ([..., 1] of x's size / H); the
composed torch ops it replaces keep an fp32 copy of x and the normalised values besides.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = kernels.call("rms_norm", x.reshape(-1, x.shape[-1]), weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx = kernels.call("rms_norm_backward", dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), weight, rstd)
        return dx.view(x.shape), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H]; weight [H] (frozen: it gets no gradient); returns [..., H] in promote(weight, x) dtype."""
    if weight.requires_grad:
        raise ValueError("rms_norm: the fused RMSNorm keeps its weight frozen; this weight requires grad")
    return _RMSNormFn.apply(x, weight, eps)
