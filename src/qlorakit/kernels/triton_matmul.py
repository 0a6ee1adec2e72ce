"""The 'triton' implementations of linear_4bit (Y = X W^T + b) and linear_4bit_grad_input (dX = dY W).

Which path computes a call (measured on an H200 by benchmarks/kernels.py; docs/kernels.md has the numbers):
  rows of X == 1, bf16/fp16/fp32    -> `gemv_4bit`: reads the packed W once, no dequantized copy;
  2 <= rows <= SMALL_M_MAX          -> `matmul_4bit_small`: fused dequantize-in-GEMM on the tensor cores;
  otherwise (and every fp64 call)   -> dequantize W into the workspace (Triton), then torch's matmul (cuBLAS).
linear_4bit_grad_input always dequantizes then multiplies (training has thousands of rows).
linear_4bit_cat / linear_4bit_cat_grad_input (several weights on one input: Q/K/V, gate/up) dequantize every
weight into consecutive rows of one workspace and run ONE matmul over the stacked [sum N_i, K] weight.

The workspace cap (`set_workspace_limit`, None by default = no cap): the stacked weight of a Llama-2-70B
gate/up pair is [57344, 8192] bf16 = 0.875 GiB of workspace for the whole run. When a call's stacked weight
(sum N_i * K elements in the call's dtype) would exceed the cap and there is more than one weight, the two cat
functions go weight by weight instead, so the workspace only ever holds one dense weight (at most the largest):
the forward allocates Y [M, sum N_i] once and writes each block X W_i^T straight into its column slice with
`torch.mm(..., out=Y[:, cols])`; the grad input computes dY[:, cols_0] W_0 and `addmm_`-accumulates the other
blocks from column slices of dY (no copies of dY). The cap only chooses stacked vs per-weight: a single weight
larger than the cap still goes through the workspace. Each element of the per-weight Y is the same K-term dot
product as in the stacked Y: bit-identical where the BLAS reduces K in the same order for both output widths
(CPU, K <= 256, in the tests); one that blocks or splits K by shape (MKL/oneDNN at larger K, cuBLAS) may sum
it in another order, within fp32 reassociation plus the final rounding. Per-weight dX also rounds its running
partial sum to dX's dtype after each weight (addmm_ accumulates into dX).

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
from .dispatch import SMALL_M_MAX, register
from .triton_dequant import dequantize_into
from .triton_gemv import INPUT_DTYPES, gemv_4bit, matmul_4bit_small, rows_of


_workspaces: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}
_workspace_limit: int | None = None


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


def set_workspace_limit(nbytes: int | None) -> None:
    """Cap, in bytes, the stacked weight that linear_4bit_cat* may dequantize into the workspace; None (the
    default) removes the cap. Process-wide. Above the cap a call of several weights goes weight by weight, so
    the workspace holds at most the largest single weight; a single weight is never split, so a cap below one
    weight's size still lets that weight through the workspace (the cap chooses stacked vs per-weight, it is not
    a hard bound). Buffers already larger than the new cap are dropped, so a smaller cap takes effect at once."""
    global _workspace_limit
    if nbytes is not None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"set_workspace_limit: expected None or an int >= 0, got {nbytes!r}")
        for key in [k for k, b in _workspaces.items() if b.numel() * b.element_size() > nbytes]:
            del _workspaces[key]
    _workspace_limit = nbytes


def workspace_limit() -> int | None:
    """The cap set by set_workspace_limit (None: no cap)."""
    return _workspace_limit


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


def _in_features(states: list[QuantState]) -> int:
    k = int(states[0].shape[1])
    if any(int(s.shape[1]) != k for s in states):
        raise ValueError(f"linear_4bit_cat: the weights' in_features differ: {[int(s.shape[1]) for s in states]}")
    return k


def per_weight(states: list[QuantState], dtype: torch.dtype) -> bool:
    """Whether linear_4bit_cat* goes weight by weight: more than one weight, and their stacked [sum N_i, K]
    copy in `dtype` is over the workspace cap."""
    limit = _workspace_limit
    return limit is not None and len(states) > 1 and sum(s.numel for s in states) * dtype.itemsize > limit


def _stacked_weight(packed: list[torch.Tensor], states: list[QuantState], dtype: torch.dtype,
                    *inputs: torch.Tensor) -> torch.Tensor:
    """[W_0; W_1; ...] [sum N_i, K] in `dtype`, each weight dequantized into its rows of the workspace (or of a
    fresh tensor when autograd records the call, as dense_weight)."""
    k = _in_features(states)
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


def _cat_per_weight(x: torch.Tensor, packed: list[torch.Tensor], states: list[QuantState]) -> torch.Tensor:
    """linear_4bit_cat one weight at a time. Each block X W_i^T is written by torch.mm straight into its column
    slice Y[:, c:c+N_i] (strides (sum N_i, 1)): torch's CPU mm (addmm_impl_cpu_) and CUDA mm (cublasCommonArgs)
    take a result with column stride 1 and row stride >= N_i as a row-major BLAS output with ldc = sum N_i and
    write it in place (any other layout they compute contiguous and copy back, so out= is correct for every
    layout), so no [M, N_i] temporary is made; the tests check the CPU result bit for bit. A call autograd
    records cannot use out= (torch refuses it): it multiplies a fresh W_i per block (dense_weight) and
    concatenates, so nothing saved is the workspace."""
    k = _in_features(states)
    x2 = x.reshape(-1, k)
    if torch.is_grad_enabled() and x.requires_grad:
        y = torch.cat([x2 @ dense_weight(p, s, x.dtype, x).t() for p, s in zip(packed, states)], dim=1)
        return y.reshape(*x.shape[:-1], y.shape[1])
    n = sum(int(s.shape[0]) for s in states)
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    col = 0
    for p, s in zip(packed, states):
        rows = int(s.shape[0])
        torch.mm(x2, dense_weight(p, s, x.dtype).t(), out=y[:, col:col + rows])
        col += rows
    return y.reshape(*x.shape[:-1], n)


def _cat_grad_input_per_weight(grad_y: torch.Tensor, packed: list[torch.Tensor],
                               states: list[QuantState]) -> torch.Tensor:
    """linear_4bit_cat_grad_input one weight at a time: dX = dY[:, cols_0] W_0, then dX += dY[:, cols_i] W_i
    (addmm_ on column slices of dY: strided BLAS inputs, not copies). Recorded calls get fresh weights."""
    k = _in_features(states)
    n = sum(int(s.shape[0]) for s in states)
    if grad_y.shape[-1] != n:
        raise ValueError(f"linear_4bit_cat_grad_input: grad_y has {grad_y.shape[-1]} columns, the weights {n} rows")
    g2 = grad_y.reshape(-1, n)
    dx = None
    col = 0
    for p, s in zip(packed, states):
        rows = int(s.shape[0])
        w = dense_weight(p, s, grad_y.dtype, grad_y)
        block = g2[:, col:col + rows]
        dx = block @ w if dx is None else dx.addmm_(block, w)
        col += rows
    return dx.reshape(*grad_y.shape[:-1], k)


@register("linear_4bit_cat", "triton")
def linear_4bit_cat_triton(x: torch.Tensor, packed: list[torch.Tensor], states: list[QuantState]) -> torch.Tensor:
    """Y = X [W_0; W_1; ...]^T. x [M, K] in the compute dtype; returns [M, sum N_i] in x.dtype. Stacked, or
    weight by weight when the stacked weight is over the workspace cap (set_workspace_limit)."""
    if per_weight(states, x.dtype):
        return _cat_per_weight(x, packed, states)
    return x @ _stacked_weight(packed, states, x.dtype, x).t()


@register("linear_4bit_cat_grad_input", "triton")
def linear_4bit_cat_grad_input_triton(grad_y: torch.Tensor, packed: list[torch.Tensor],
                                      states: list[QuantState]) -> torch.Tensor:
    """dX = dY [W_0; W_1; ...]. grad_y [M, sum N_i]; returns [M, K] in grad_y.dtype. Stacked, or weight by
    weight when the stacked weight is over the workspace cap (set_workspace_limit)."""
    if per_weight(states, grad_y.dtype):
        return _cat_grad_input_per_weight(grad_y, packed, states)
    return grad_y @ _stacked_weight(packed, states, grad_y.dtype, grad_y)
