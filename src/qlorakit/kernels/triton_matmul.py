"""The 'triton' implementations of linear_4bit (Y = X W^T + b) and linear_4bit_grad_input (dX = dY W).

Which path computes a call (measured on an H200 by benchmarks/kernels.py; docs/kernels.md has the numbers):
  rows of X == 1, bf16/fp16/fp32    -> `gemv_4bit`: reads the packed W once, no dequantized copy;
  2 <= rows <= SMALL_M_MAX          -> `matmul_4bit_small`: fused dequantize-in-GEMM on the tensor cores;
  otherwise (and every fp64 call)   -> dequantize W into the workspace (Triton), then torch's matmul (cuBLAS).
linear_4bit_grad_input always dequantizes then multiplies (training has thousands of rows).
linear_4bit_cat / linear_4bit_cat_grad_input (several weights on one input: Q/K/V, gate/up) dequantize every
weight into consecutive rows of one workspace and run ONE matmul over the stacked [sum N_i, K] weight.

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


def _stacked_weight(packed: list[torch.Tensor], states: list[QuantState], dtype: torch.dtype,
                    *inputs: torch.Tensor) -> torch.Tensor:
    """[W_0; W_1; ...] [sum N_i, K] in `dtype`, each weight dequantized into its rows of the workspace (or of a
    fresh tensor when autograd records the call, as dense_weight)."""
    k = int(states[0].shape[1])
    if any(int(s.shape[1]) != k for s in states):
        raise ValueError(f"linear_4bit_cat: the weights' in_features differ: {[int(s.shape[1]) for s in states]}")
    n = sum(int(s.shape[0]) for s in states)
    device = packed[0].device
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    w = torch.empty((n, k), dtype=dtype, device=device) if recording else workspace(torch.Size((n, k)), dtype, device)
    row = 0
    for p, s in zip(packed, states):
        rows = int(s.shape[0])
        dequantize_into(p, s, w[row:row + rows])
        row += rows
    return w


@register("linear_4bit_cat", "triton")
def linear_4bit_cat_triton(x: torch.Tensor, packed: list[torch.Tensor], states: list[QuantState]) -> torch.Tensor:
    """Y = X [W_0; W_1; ...]^T. x [M, K] in the compute dtype; returns [M, sum N_i] in x.dtype."""
    return x @ _stacked_weight(packed, states, x.dtype, x).t()


@register("linear_4bit_cat_grad_input", "triton")
def linear_4bit_cat_grad_input_triton(grad_y: torch.Tensor, packed: list[torch.Tensor],
                                      states: list[QuantState]) -> torch.Tensor:
    """dX = dY [W_0; W_1; ...]. grad_y [M, sum N_i]; returns [M, K] in grad_y.dtype."""
    return grad_y @ _stacked_weight(packed, states, grad_y.dtype, grad_y)
