"""The AdamW update in plain PyTorch: the specification the Triton kernel is tested against, and the CPU path.

One parameter per call, in place. All arithmetic is fp32, one IEEE operation at a time, with the constants of
the step rounded to fp32 once (`StepConstants`):

    p      <- p * decay                               decay = 1 - lr * weight_decay   (decoupled weight decay)
    m      <- m * beta1 + g * (1 - beta1)
    v      <- v * beta2 + (g * g) * (1 - beta2)
    denom  <- sqrt(v) * (1 / sqrt(1 - beta2^t)) + eps
    p      <- p - (m / denom) * (lr / (1 - beta1^t))

This is torch.optim.AdamW's update (same bias corrections, same placement of eps), written without fused
multiply-adds (torch's lerp/addcmul may contract; the Triton kernel is launched with fp fusion off) and with a
correctly rounded sqrt (computed in fp64 and rounded once, which is exact for fp32 inputs; torch's CPU fp32
sqrt is not always correctly rounded), so that the kernel can match it bit for bit. It agrees with
torch.optim.AdamW to fp32 rounding, not bit for bit.

bf16/fp16 parameters are updated in fp32 and rounded once to their dtype; moments are always fp32 (or 8-bit).
8-bit moments are dequantized, updated, and requantized (`state_8bit`); the parameter update uses the fp32
moments of this step, before requantization.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from .state_8bit import dequantize_state, quantize_state, state_maps


def f32(x: float) -> float:
    """x rounded to the nearest fp32 (ties to even), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True)
class StepConstants:
    """The scalars of one parameter's update at step t (t counted from 1), each already rounded to fp32.
    `row()` is their order in the kernel's per-tensor table."""

    decay: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    inv_bias2_sqrt: float
    eps: float
    step_size: float

    FIELDS = 8

    @classmethod
    def for_step(cls, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 step: int) -> StepConstants:
        beta1, beta2 = float(betas[0]), float(betas[1])
        bias1 = 1.0 - beta1**step
        bias2 = 1.0 - beta2**step
        return cls(
            decay=f32(1.0 - lr * weight_decay),
            beta1=f32(beta1),
            one_minus_beta1=f32(1.0 - beta1),
            beta2=f32(beta2),
            one_minus_beta2=f32(1.0 - beta2),
            inv_bias2_sqrt=f32(1.0 / bias2**0.5),
            eps=f32(eps),
            step_size=f32(lr / bias1),
        )

    def row(self) -> tuple[float, ...]:
        return (self.decay, self.beta1, self.one_minus_beta1, self.beta2, self.one_minus_beta2,
                self.inv_bias2_sqrt, self.eps, self.step_size)


@dataclass
class UpdateItem:
    """One parameter's update: `states` is (exp_avg, exp_avg_sq) fp32 [n], or for 8-bit (m codes uint8 [n],
    v codes uint8 [n], m absmax fp32 [nb], v absmax fp32 [nb]); all contiguous, on the parameter's device.
    `state_ptrs`, when given, are the states' data pointers (computed once by the arena, not every step)."""

    param: torch.Tensor
    grad: torch.Tensor
    states: tuple[torch.Tensor, ...]
    constants: StepConstants
    quantized: bool
    block_size: int
    state_ptrs: tuple[int, ...] | None = None

    def pointers(self) -> tuple[int, ...]:
        """The kernel's four state-pointer columns: m, v, then the absmax vectors (0 for fp32 states)."""
        if self.state_ptrs is not None:
            return self.state_ptrs
        return state_pointers(self.states, self.quantized)


def state_pointers(states: tuple[torch.Tensor, ...], quantized: bool) -> tuple[int, ...]:
    if quantized:
        return tuple(s.data_ptr() for s in states)
    return states[0].data_ptr(), states[1].data_ptr(), 0, 0


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root."""
    return x.double().sqrt().float()


def _update(p32: torch.Tensor, g32: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
            c: StepConstants) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p32 = p32 * c.decay
    m = m * c.beta1 + g32 * c.one_minus_beta1
    v = v * c.beta2 + (g32 * g32) * c.one_minus_beta2
    denom = sqrt_rn(v) * c.inv_bias2_sqrt + c.eps
    p32 = p32 - (m / denom) * c.step_size
    return p32, m, v


def _param_and_grad(p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if g.is_sparse:
        raise TypeError("qlorakit AdamW does not support sparse gradients")
    return p.detach().reshape(-1).to(torch.float32), g.reshape(-1).to(torch.float32)


@torch.no_grad()
def adamw_update_32bit(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                       c: StepConstants) -> None:
    """In place. p: any float dtype/shape; g: p's shape; exp_avg, exp_avg_sq: fp32 [p.numel()], p's device."""
    p32, g32 = _param_and_grad(p, g)
    p32, m, v = _update(p32, g32, exp_avg, exp_avg_sq, c)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    p.copy_(p32.view(p.shape))


@torch.no_grad()
def adamw_update_8bit(p: torch.Tensor, g: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                      v_codes: torch.Tensor, v_absmax: torch.Tensor, c: StepConstants, block_size: int) -> None:
    """In place. m_codes, v_codes: uint8 [p.numel()]; m_absmax, v_absmax: fp32 [ceil(numel / block_size)]."""
    maps = state_maps(p.device)
    p32, g32 = _param_and_grad(p, g)
    m = dequantize_state(m_codes, m_absmax, maps.signed, block_size)
    v = dequantize_state(v_codes, v_absmax, maps.unsigned, block_size)
    p32, m, v = _update(p32, g32, m, v, c)
    q, a = quantize_state(m, maps.signed, maps.signed_mid, block_size)
    m_codes.copy_(q)
    m_absmax.copy_(a)
    q, a = quantize_state(v, maps.unsigned, maps.unsigned_mid, block_size)
    v_codes.copy_(q)
    v_absmax.copy_(a)
    p.copy_(p32.view(p.shape))
