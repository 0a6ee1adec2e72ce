"""One autograd function for a LoRA layer on a 4-bit base: y = x W^T + b + s * (drop(x) A^T) B^T.

It saves dropout(x) (what the adapter gradient needs; x itself without dropout), the dropout mask as bool,
and x_drop A^T ([.., r], small); never a dequantized weight and never an fp32 copy of x. Backward computes dX = dY W through the
dispatched 4-bit kernel plus the low-rank term, and the adapter gradients, in the compute dtype of x.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from ..quant.state import QuantState


class _LoraLinear4bitFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a_w: torch.Tensor, b_w: torch.Tensor, packed: torch.Tensor,
                state: QuantState, bias: torch.Tensor | None, scaling: float, p: float, training: bool):
        dt = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            mask = None
            x_drop = x
            if training and p > 0:
                # The same draw as nn.Dropout / F.dropout, so fused and composed layers see the same mask.
                x_drop, mask = torch.native_dropout(x, p, True)
            y = kernels.call("linear_4bit", x, packed, state, bias)
            n_out = y.shape[-1]
            xa = x_drop.reshape(-1, x.shape[-1]) @ a_w.to(dt).t()
            y.view(-1, n_out).addmm_(xa, b_w.to(dt).t(), alpha=scaling)
        # The adapter gradient needs x_drop (= x without dropout), never x itself; dX's low-rank term needs the mask.
        ctx.save_for_backward(x_drop, mask if mask is not None else torch.empty(0, dtype=torch.bool), xa, a_w, b_w)
        ctx.packed, ctx.state, ctx.scaling, ctx.p, ctx.has_mask = packed, state, scaling, p, mask is not None
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x_drop, mask, xa, a_w, b_w = ctx.saved_tensors
        dt, s = dy.dtype, ctx.scaling
        k = x_drop.shape[-1]
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            a, b = a_w.to(dt), b_w.to(dt)
            grad_b = (dy2.t() @ xa.to(dt)).mul_(s)
            g = (dy2 @ b).mul_(s)
            grad_a = g.t() @ x_drop.reshape(-1, k).to(dt)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = kernels.call("linear_4bit_grad_input", dy, ctx.packed, ctx.state)
                low_rank = g @ a
                if ctx.has_mask:  # one fused kernel: low_rank * mask / (1 - p)
                    low_rank = torch.ops.aten.native_dropout_backward(low_rank, mask.reshape(-1, k),
                                                                      1.0 / (1.0 - ctx.p))
                grad_x.view(-1, k).add_(low_rank.to(grad_x.dtype))
        return grad_x, grad_a.to(a_w.dtype), grad_b.to(b_w.dtype), None, None, None, None, None, None


def lora_linear_4bit(x: torch.Tensor, a_w: torch.Tensor, b_w: torch.Tensor, packed: torch.Tensor,
                     state: QuantState, bias: torch.Tensor | None, scaling: float, dropout: float,
                     training: bool) -> torch.Tensor:
    """x [..., K] (compute dtype); a_w [r, K], b_w [N, r] (adapter dtype); returns [..., N] in x.dtype."""
    return _LoraLinear4bitFn.apply(x, a_w, b_w, packed, state, bias, scaling, dropout, training)
