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


@register("quantize_4bit", "reference")
def quantize_ref(
    x: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool
) -> tuple[torch.Tensor, QuantState]:
    return quantize_4bit(x, blocksize, quant_type, double_quant)
