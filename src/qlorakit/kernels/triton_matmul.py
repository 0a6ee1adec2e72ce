"""The 'triton' implementations of linear_4bit (Y = X W^T + b) and linear_4bit_grad_input (dX = dY W).

Which path computes a call (measured on an H200 by benchmarks/kernels.py; docs/kernels.md has the numbers):
  rows of X == 1, bf16/fp16/fp32    -> `gemv_4bit`: reads the packed W once, no dequantized copy;
  2 <= rows <= SMALL_M_MAX          -> `matmul_4bit_small`: fused dequantize-in-GEMM on the tensor cores;
  otherwise (and every fp64 call)   -> dequantize W into the workspace (Triton), then torch's matmul (cuBLAS).
linear_4bit_grad_input always dequantizes then multiplies (training has thousands of rows).

The workspace: one flat buffer per (device, dtype, stream) that grows to the largest weight seen and is
overwritten by the next call on that stream, so a 4-bit model never holds more than one dense weight per
dtype. Because the next call overwrites it, it must never be saved for backward: the nn layer's autograd
function saves only the packed weight, and a call made with autograd recording (grad enabled and an input
that requires grad, e.g. a direct call outside nn.Linear4bit) dequantizes into a fresh tensor instead, so the
graph torch builds for that call stays valid. `release_workspace()` frees the buffers.
"""

from __future__ import annotations

import torch

from ..quant.state import QuantState
from .dispatch import register
from .triton_dequant import dequantize_into
from .triton_gemv import INPUT_DTYPES, gemv_4bit, matmul_4bit_small, rows_of

# Rows of X up to which the fused kernel beats dequantize + cuBLAS (H200, Llama shapes; docs/kernels.md).
SMALL_M_MAX = 16

_workspaces: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0


def workspace(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [shape] view of the reused buffer for (device, dtype, current stream); contents are garbage."""
    numel = 1
    for s in shape:
        numel *= int(s)
    key = (device, dtype, _stream_id(device))
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        _workspaces.pop(key, None)  # free the smaller one before allocating the larger
        buf = torch.empty(numel, dtype=dtype, device=device)
        _workspaces[key] = buf
    return buf[:numel].view(shape)


def release_workspace() -> None:
    """Drop every workspace buffer (the caching allocator keeps the memory until empty_cache)."""
    _workspaces.clear()


def workspace_bytes() -> int:
    return sum(b.numel() * b.element_size() for b in _workspaces.values())


def dense_weight(packed: torch.Tensor, state: QuantState, dtype: torch.dtype, *inputs: torch.Tensor | None):
    """W [N, K] in `dtype`: in the workspace, or in a fresh tensor when autograd is recording this call."""
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if recording:
        out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    else:
        out = workspace(state.shape, dtype, packed.device)
    return dequantize_into(packed, state, out)


def plan(rows: int, dtype: torch.dtype, recording: bool = False) -> str:
    """Which path computes linear_4bit for `rows` rows of X: 'gemv', 'fused' or 'dequant_matmul'."""
    if recording or dtype not in INPUT_DTYPES or rows == 0:
        return "dequant_matmul"
    if rows == 1:
        return "gemv"
    if rows <= SMALL_M_MAX:
        return "fused"
    return "dequant_matmul"


@register("linear_4bit", "triton")
def linear_4bit_triton(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Y = X W^T (+ b). x: [..., K] in the compute dtype; W [N, K] 4-bit; returns [..., N] in x.dtype."""
    recording = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    path = plan(rows_of(x), x.dtype, recording)
    if path == "dequant_matmul":
        w = dense_weight(packed, state, x.dtype, x, bias)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2d = x.reshape(-1, x.shape[-1])
    kernel = gemv_4bit if path == "gemv" else matmul_4bit_small
    return kernel(x2d, packed, state, bias).reshape(*x.shape[:-1], state.shape[0])


@register("linear_4bit_grad_input", "triton")
def linear_4bit_grad_input_triton(grad_y: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """dX = dY W. grad_y: [..., N]; returns [..., K] in grad_y.dtype."""
    w = dense_weight(packed, state, grad_y.dtype, grad_y)
    return grad_y @ w
