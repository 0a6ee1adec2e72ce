"""One autograd function for a LoRA layer on a 4-bit base: y = x W^T + b + s * (drop(x) A^T) B^T.

It saves x itself (which the layer before usually keeps alive anyway) and x_drop A^T ([.., r], small); never a
dequantized weight, never an fp32 copy of x, and no dropout mask: backward redraws the same mask from the
random generator's state at the forward (nn/dropout_draws.py: in eager execution, and through two custom ops
while traced). Backward computes dX = dY W through the dispatched 4-bit kernel plus the low-rank term, and the
adapter gradients, in the compute dtype of x.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from .. import kernels
from ..quant.state import QuantState
from . import dropout_draws
from .dropout_draws import Draws


class _LoraLinear4bitFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a_w: torch.Tensor, b_w: torch.Tensor, packed: torch.Tensor,
                state: QuantState, bias: torch.Tensor | None, scaling: float, p: float, training: bool):
        dt = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            draws = dropout_draws.start(x.device, p, training)
            # The same draw as nn.Dropout / F.dropout, so fused and composed layers see the same mask.
            x_drop = draws.draw(x, a_w) if draws is not None else x
            y = kernels.call("linear_4bit", x, packed, state, bias)
            n_out = y.shape[-1]
            xa = x_drop.reshape(-1, x.shape[-1]) @ a_w.to(dt).t()
            del x_drop
            y.view(-1, n_out).addmm_(xa, b_w.to(dt).t(), alpha=scaling)
        ctx.save_for_backward(x, xa, a_w, b_w, *dropout_draws.saved_states(draws))
        ctx.packed, ctx.state, ctx.scaling, ctx.draws = packed, state, scaling, dropout_draws.for_ctx(draws)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, xa, a_w, b_w, *states = ctx.saved_tensors
        draws = dropout_draws.restore(ctx.draws, states)
        dt, s = dy.dtype, ctx.scaling
        k = x.shape[-1]
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            a, b = a_w.to(dt), b_w.to(dt)
            grad_b = (dy2.t() @ xa.to(dt)).mul_(s)
            g = (dy2 @ b).mul_(s)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = kernels.call("linear_4bit_grad_input", dy, ctx.packed, ctx.state)
            grad_x2 = None if grad_x is None else grad_x.view(-1, k)
            grad_a = lora_input_terms(x.reshape(-1, k), [g], [a], draws, grad_x2)[0]
        return grad_x, grad_a.to(a_w.dtype), grad_b.to(b_w.dtype), None, None, None, None, None, None


def lora_input_terms(x2: torch.Tensor, gs: list[torch.Tensor], a_s: list[torch.Tensor], draws: Draws | None,
                     grad_x: torch.Tensor | None) -> list[torch.Tensor]:
    """The parts of a LoRA backward that need the (dropped-out) input, for adapters i = 0.. that read the same
    x2 [M, K] with one dropout draw each (`draws`, replayed here; None: no dropout), in the order the forward drew
    them.

    gs[i] = s_i * dY_i B_i [M, r_i] and a_s[i] = A_i [r_i, K] in x2's dtype. Returns grad A_i = gs[i]^T
    drop_i(x2); when grad_x [M, K] is given, adds sum_i drop_i'(gs[i] A_i) to it in place (the low-rank term of
    dX, through the same masks)."""
    grads = []
    with draws.replaying() if draws is not None else nullcontext():
        for g, a in zip(gs, a_s):
            if draws is not None:
                x_drop, mask = draws.redraw(x2)
            else:
                x_drop, mask = x2, None
            grads.append(g.t() @ x_drop)
            del x_drop
            if grad_x is None:
                continue
            if mask is None:
                grad_x.addmm_(g, a)
            else:  # one fused kernel: low_rank * mask / (1 - p)
                grad_x.add_(torch.ops.aten.native_dropout_backward(g @ a, mask, 1.0 / (1.0 - draws.p)))
    return grads


def lora_linear_4bit(x: torch.Tensor, a_w: torch.Tensor, b_w: torch.Tensor, packed: torch.Tensor,
                     state: QuantState, bias: torch.Tensor | None, scaling: float, dropout: float,
                     training: bool) -> torch.Tensor:
    """x [..., K] (compute dtype); a_w [r, K], b_w [N, r] (adapter dtype); returns [..., N] in x.dtype."""
    return _LoraLinear4bitFn.apply(x, a_w, b_w, packed, state, bias, scaling, dropout, training)
