"""Fused LoRA projections for Llama-style blocks: several 4-bit LoRA linears on one input (Q/K/V; gate/up), and
the whole SwiGLU MLP, each one autograd function.

Specification: the composed layers they replace, `LoraLinear` per projection (y_i = x W_i^T + b_i +
s_i * (drop_i(x) A_i^T) B_i^T, each projection with its own dropout draw, in projection order, as PEFT's one
nn.Dropout per layer draws them) and `down(silu(gate(x)) * up(x))` for the MLP.

What fusing buys: the 4-bit weights of the group are dequantized into one stacked [sum N_i, K] buffer and
multiplied in ONE matmul forward and one backward (kernels.linear_4bit_cat); x is saved once for the whole group;
no dropout mask is kept (backward redraws them, nn/dropout_draws.py). The MLP function saves x, the
gate/up output (or, with keep_gate_up=False, nothing more: backward recomputes it from x) and the small
x_drop A^T products; never the SwiGLU product nor a dense weight.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels
from ..quant.state import QuantState
from . import dropout_draws
from .dropout_draws import Draws
from .lora_fused import lora_input_terms


@dataclass(frozen=True)
class Norm:
    """An RMSNorm (frozen weight [H]) applied to a group's input inside the fused function, so that only the
    un-normed input is saved (the normed one is recomputed in backward: one pass) and its gradient flows
    through rms_norm_backward. `dtype`: the compute dtype the normed input is cast to (as autocast would)."""

    weight: torch.Tensor
    eps: float
    dtype: torch.dtype


def _normed(x2: torch.Tensor, norm: Norm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if norm is None:
        return x2, None
    xn, rstd = kernels.call("rms_norm", x2, norm.weight, norm.eps)
    return xn.to(norm.dtype), rstd


def _norm_backward(grad_xn: torch.Tensor | None, x2: torch.Tensor, norm: Norm | None,
                   rstd: torch.Tensor | None) -> torch.Tensor | None:
    if norm is None or grad_xn is None:
        return grad_xn
    return kernels.call("rms_norm_backward", grad_xn.to(x2.dtype), x2, norm.weight, rstd)


@dataclass(frozen=True)
class Projection:
    """One frozen 4-bit base weight [out, in] with its bias and LoRA scaling (the adapter tensors travel as
    autograd inputs)."""

    packed: torch.Tensor
    state: QuantState
    bias: torch.Tensor | None
    scaling: float

    @property
    def out_features(self) -> int:
        return int(self.state.shape[0])


def _group_forward(x2: torch.Tensor, group: tuple[Projection, ...], ab: tuple[torch.Tensor, ...],
                   draws: Draws | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Y [M, sum N_i] = x2 [W_i]^T + [b_i] + [s_i drop_i(x2) A_i^T B_i^T], and the xa_i = drop_i(x2) A_i^T.
    Dropout masks come from `draws` in projection order (drawn in forward, the forward's again when a backward
    recomputes this); None: no dropout."""
    dt = x2.dtype
    y = kernels.call("linear_4bit_cat", x2, [g.packed for g in group], [g.state for g in group])
    xas, col = [], 0
    for i, proj in enumerate(group):
        a, b = ab[2 * i].to(dt), ab[2 * i + 1].to(dt)
        n = proj.out_features
        part = y[:, col:col + n]
        if proj.bias is not None:
            part.add_(proj.bias.to(dt))
        x_drop = draws.draw(x2, ab[2 * i]) if draws is not None else x2
        xa = x_drop @ a.t()
        del x_drop
        part.addmm_(xa, b.t(), alpha=proj.scaling)
        xas.append(xa)
        col += n
    return y, xas


def _group_backward(dy2: torch.Tensor, x2: torch.Tensor, xas: list[torch.Tensor], group: tuple[Projection, ...],
                    ab: tuple[torch.Tensor, ...], draws: Draws | None,
                    need_x: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(dX [M, K] or None, [grad A_0, grad B_0, grad A_1, ...]) for dY = dy2 [M, sum N_i] (contiguous)."""
    dt = dy2.dtype
    grad_x = None
    if need_x:
        grad_x = kernels.call("linear_4bit_cat_grad_input", dy2, [g.packed for g in group], [g.state for g in group])
    gs, grad_bs, col = [], [], 0
    for i, proj in enumerate(group):
        n = proj.out_features
        dy_i = dy2[:, col:col + n]
        grad_bs.append((dy_i.t() @ xas[i].to(dt)).mul_(proj.scaling))
        gs.append((dy_i @ ab[2 * i + 1].to(dt)).mul_(proj.scaling))
        col += n
    grad_as = lora_input_terms(x2, gs, [ab[2 * i].to(dt) for i in range(len(group))], draws, grad_x)
    grads = []
    for i in range(len(group)):
        grads += [grad_as[i].to(ab[2 * i].dtype), grad_bs[i].to(ab[2 * i + 1].dtype)]
    return grad_x, grads


class _LoraGroupFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: tuple[Projection, ...], p: float, training: bool,
                norm: Norm | None, *ab: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xn, rstd = _normed(x2, norm)
            draws = dropout_draws.start(x.device, p, training)
            y, xas = _group_forward(xn, group, ab, draws)
            del xn
        ctx.save_for_backward(x, rstd, *xas, *ab, *dropout_draws.saved_states(draws))
        ctx.group, ctx.draws, ctx.norm, ctx.n_ab = group, dropout_draws.for_ctx(draws), norm, len(ab)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        saved = ctx.saved_tensors
        n = len(ctx.group)
        x, rstd, xas = saved[0], saved[1], list(saved[2:2 + n])
        ab, states = saved[2 + n:2 + n + ctx.n_ab], saved[2 + n + ctx.n_ab:]
        draws = dropout_draws.restore(ctx.draws, states)
        with torch.autocast(dy.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xn = _normed(x2, ctx.norm)[0]
            dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
            grad_xn, grads = _group_backward(dy2, xn, xas, ctx.group, ab, draws, ctx.needs_input_grad[0])
            del xn
            grad_x = _norm_backward(grad_xn, x2, ctx.norm, rstd)
        return (None if grad_x is None else grad_x.view(x.shape)), None, None, None, None, *grads


def lora_group_4bit(x: torch.Tensor, group: tuple[Projection, ...],
                    adapters: list[tuple[torch.Tensor, torch.Tensor]] | None, dropout: float, training: bool,
                    norm: Norm | None = None) -> torch.Tensor:
    """x [..., K] (compute dtype, or any float dtype with `norm`); group[i] with adapters[i] = (A_i [r_i, K],
    B_i [N_i, r_i]); returns [..., sum N_i]: the projections' outputs of x (of rms_norm(x) with `norm`) side by
    side, in group order. adapters None: the base weights alone (adapters switched off; no gradients)."""
    if adapters is None:
        return _base_group(x, group, norm)
    ab = [t for pair in adapters for t in pair]
    return _LoraGroupFn.apply(x, tuple(group), dropout, training, norm, *ab)


def _base_group(x: torch.Tensor, group: tuple[Projection, ...], norm: Norm | None) -> torch.Tensor:
    """The group's base projections of x (of rms_norm(x) with `norm`), [..., sum N_i], without autograd: a
    preference objective's reference pass with the adapters switched off runs the stacked 4-bit matmul too."""
    if torch.is_grad_enabled():
        raise RuntimeError("the fused base-only projections run without gradients (the adapters are switched off)")
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1])
        xn = _normed(x2, norm)[0]
        y = kernels.call("linear_4bit_cat", xn, [g.packed for g in group], [g.state for g in group])
        col = 0
        for proj in group:
            if proj.bias is not None:
                y[:, col:col + proj.out_features].add_(proj.bias.to(y.dtype))
            col += proj.out_features
    return y.view(*x.shape[:-1], y.shape[-1])


class _LoraSwiGLUFn(torch.autograd.Function):
    """y = down(silu(gate(x)) * up(x)) with gate/up fused (one stacked 4-bit matmul) and LoRA on all three."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate_up: tuple[Projection, Projection], down: Projection, p: float,
                training: bool, keep_gate_up: bool, norm: Norm | None, *ab: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xn, rstd = _normed(x2, norm)
            draws_gu = dropout_draws.start(x.device, p, training)
            gu, xas = _group_forward(xn, gate_up, ab[:4], draws_gu)
            del xn
            act = swiglu(gu)
            draws_d = dropout_draws.start(x.device, p, training)
            y, xa_d = _group_forward(act, (down,), ab[4:], draws_d)
            del act
        # gate/up draw two masks, down one: the traced draws' states are the last 3 saved tensors (or none)
        ctx.save_for_backward(x, rstd, gu if keep_gate_up else None, *xas, *xa_d, *ab,
                              *dropout_draws.saved_states(draws_gu), *dropout_draws.saved_states(draws_d))
        ctx.gate_up, ctx.down, ctx.norm = gate_up, down, norm
        ctx.draws = dropout_draws.for_ctx(draws_gu), dropout_draws.for_ctx(draws_d)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, rstd, gu, xa_g, xa_u, xa_d, *rest = ctx.saved_tensors
        ab, states = rest[:6], rest[6:]
        draws_gu = dropout_draws.restore(ctx.draws[0], states[:2])
        draws_d = dropout_draws.restore(ctx.draws[1], states[2:])
        with torch.autocast(dy.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xn = _normed(x2, ctx.norm)[0]
            if gu is None:  # recompute gate/up (the same masks: the same draws replayed)
                with draws_gu.replaying() if draws_gu is not None else nullcontext():
                    gu = _group_forward(xn, ctx.gate_up, tuple(ab[:4]), draws_gu)[0]
            act = swiglu(gu)
            dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
            d_act, grads_d = _group_backward(dy2, act, [xa_d], (ctx.down,), tuple(ab[4:]), draws_d, True)
            del act
            d_gu = swiglu_backward(d_act, gu)
            del gu, d_act
            grad_xn, grads_gu = _group_backward(d_gu, xn, [xa_g, xa_u], ctx.gate_up, tuple(ab[:4]), draws_gu,
                                                ctx.needs_input_grad[0])
            del xn, d_gu
            grad_x = _norm_backward(grad_xn, x2, ctx.norm, rstd)
        return ((None if grad_x is None else grad_x.view(x.shape)), None, None, None, None, None, None,
                *grads_gu, *grads_d)


def lora_swiglu_4bit(x: torch.Tensor, gate: Projection, up: Projection, down: Projection,
                     adapters: list[tuple[torch.Tensor, torch.Tensor]] | None, dropout: float, training: bool,
                     keep_gate_up: bool = True, norm: Norm | None = None) -> torch.Tensor:
    """x [..., H] (compute dtype, or any float dtype with `norm`); adapters = [(A_gate, B_gate), (A_up, B_up),
    (A_down, B_down)]; returns [..., H] of x (of rms_norm(x) with `norm`). keep_gate_up=False saves only x for
    backward and recomputes the gate/up matmul there. adapters None: the base MLP alone (no gradients)."""
    if adapters is None:  # switched off, no gradients: the base MLP through the same stacked matmul
        gu = _base_group(x, (gate, up), norm)
        act = swiglu(gu.reshape(-1, gu.shape[-1]))  # the kernels take [M, 2I]
        return _base_group(act, (down,), None).view(*x.shape[:-1], down.out_features)
    ab = [t for pair in adapters for t in pair]
    return _LoraSwiGLUFn.apply(x, (gate, up), down, dropout, training, keep_gate_up, norm, *ab)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """gu [M, 2I] = [gate | up] -> silu(gate) * up [M, I] (kernels' `swiglu`)."""
    return kernels.call("swiglu", gu)


def swiglu_backward(d_act: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
    """d/d[gate | up] of silu(gate) * up for d_act [M, I]: [M, 2I] (kernels' `swiglu_backward`)."""
    return kernels.call("swiglu_backward", d_act, gu)
