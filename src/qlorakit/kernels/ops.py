"""Every dispatched operation as a PyTorch custom op, `torch.ops.qlorakit.<name>` (torch.library.custom_op).

Each op's body asks the dispatch point (dispatch.implementation) for the backend chosen for the run and calls it,
so numerics are the backends' own; its fake implementation gives the outputs' shapes, dtypes and devices without
computing, so torch.compile and meta / fake tensors trace through the op as one opaque call. `call(op, ...)` (what
`kernels.call` is) takes the backends' own arguments. In eager execution it calls the backend directly, exactly as
before the operations were custom ops (the custom-op layer costs eager nothing: about 0.3 us for the check); only
while tracing (`tracing()`: dynamo, torch.export, make_fx, fake tensors, any torch dispatch mode) does it go through
the op, via the wrappers below.

The ops take tensors and numbers only, so a QuantState crosses the op boundary as a list of tensors and a list of
ints (kernels/state_args.py); the thin wrappers below (same arguments as the backends) pack and unpack it.
quantize_4bit returns [packed, *state tensors], double quantization always in nested blocks of 256 (what both
backends do).

Autograd: the nn/ autograd functions call the ops with grad mode off and own the backward of the layers. The four
4-bit matmuls also have a formula of their own, so that a traced direct differentiable call (x, or grad_y, that
requires grad) works as an eager one does: linear_4bit -> dX by linear_4bit_grad_input (and d bias = dY summed),
linear_4bit_grad_input -> linear_4bit, and the same pair for the _cat ops. The other ops have none: a backward
through a direct call of one of them is torch's error "no autograd formula was registered".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import QlorakitError
from ..logs import say_once
from ..quant.double_quant import DEFAULT_NESTED_BLOCKSIZE
from ..quant.state import QuantState
from . import dispatch
from .state_args import header, headers, state_args, states_of

_F32 = torch.float32
log = logging.getLogger("qlorakit.kernels")


def _backend(op: str, first: Tensor) -> Callable[..., Any]:
    """The implementation chosen for `op` on the device of its first tensor argument."""
    return dispatch.implementation(op, first.device)[1]


def _ceil_div(a, b):
    return -(-a // b)


# --- dequantize / quantize ---------------------------------------------------------------------------------------

@torch.library.custom_op("qlorakit::dequantize_4bit", mutates_args=())
def dequantize_4bit_op(packed: Tensor, state: list[Tensor], state_ints: list[int], dtype: torch.dtype) -> Tensor:
    """packed uint8 [(numel + 1) // 2, 1] -> `dtype` tensor of the state's shape."""
    return _backend("dequantize_4bit", packed)(packed, states_of(state, state_ints)[0], dtype)


@dequantize_4bit_op.register_fake
def _(packed, state, state_ints, dtype):
    return packed.new_empty(next(headers(state_ints))[4], dtype=dtype)


@torch.library.custom_op("qlorakit::quantize_4bit", mutates_args=())
def quantize_4bit_op(x: Tensor, blocksize: int, quant_type: str, double_quant: bool) -> list[Tensor]:
    """[packed uint8 [(numel + 1) // 2, 1], *the state's tensors (state_args order)] on x's device."""
    packed, state = _backend("quantize_4bit", x)(x, blocksize, quant_type, double_quant)
    if state.nested is not None and state.nested.blocksize != DEFAULT_NESTED_BLOCKSIZE:
        raise QlorakitError(f"quantize_4bit: the backend double-quantized in blocks of {state.nested.blocksize}; "
                            f"the op's contract is {DEFAULT_NESTED_BLOCKSIZE}")
    return [packed, *state_args([state])[0]]


@quantize_4bit_op.register_fake
def _(x, blocksize, quant_type, double_quant):
    n = x.numel()
    n_blocks = _ceil_div(n, blocksize)
    out = [x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), x.new_empty(16, dtype=_F32)]
    if not double_quant:
        return out + [x.new_empty(n_blocks, dtype=_F32)]
    return out + [x.new_empty(n_blocks, dtype=torch.uint8),
                  x.new_empty(_ceil_div(n_blocks, DEFAULT_NESTED_BLOCKSIZE), dtype=_F32),
                  x.new_empty((), dtype=_F32), x.new_empty(256, dtype=_F32)]


def dequantize_4bit(packed: Tensor, state: QuantState, dtype: torch.dtype) -> Tensor:
    tensors, ints = state_args([state])
    return dequantize_4bit_op(packed, tensors, ints, dtype)


def quantize_4bit(x: Tensor, blocksize: int, quant_type: str, double_quant: bool) -> tuple[Tensor, QuantState]:
    packed, *tensors = quantize_4bit_op(x, blocksize, quant_type, double_quant)
    ints = header(quant_type, x.dtype, blocksize, DEFAULT_NESTED_BLOCKSIZE if double_quant else 0, x.shape)
    return packed, states_of(tensors, ints)[0]


# --- the 4-bit matmuls -------------------------------------------------------------------------------------------

@torch.library.custom_op("qlorakit::linear_4bit", mutates_args=())
def linear_4bit_op(x: Tensor, packed: Tensor, state: list[Tensor], state_ints: list[int],
                   bias: Tensor | None) -> Tensor:
    """Y = X W^T (+ b): x [..., K] -> [..., N] in x.dtype."""
    return _backend("linear_4bit", x)(x, packed, states_of(state, state_ints)[0], bias)


@linear_4bit_op.register_fake
def _(x, packed, state, state_ints, bias):
    return x.new_empty((*x.shape[:-1], next(headers(state_ints))[4][0]))


@torch.library.custom_op("qlorakit::linear_4bit_grad_input", mutates_args=())
def linear_4bit_grad_input_op(grad_y: Tensor, packed: Tensor, state: list[Tensor], state_ints: list[int]) -> Tensor:
    """dX = dY W: grad_y [..., N] -> [..., K] in grad_y.dtype."""
    return _backend("linear_4bit_grad_input", grad_y)(grad_y, packed, states_of(state, state_ints)[0])


@linear_4bit_grad_input_op.register_fake
def _(grad_y, packed, state, state_ints):
    return grad_y.new_empty((*grad_y.shape[:-1], next(headers(state_ints))[4][1]))


@torch.library.custom_op("qlorakit::linear_4bit_cat", mutates_args=())
def linear_4bit_cat_op(x: Tensor, packed: list[Tensor], states: list[Tensor], states_ints: list[int]) -> Tensor:
    """Y = X [W_0; W_1; ...]^T: x [M, K] -> [M, sum N_i] in x.dtype."""
    return _backend("linear_4bit_cat", x)(x, packed, states_of(states, states_ints))


@linear_4bit_cat_op.register_fake
def _(x, packed, states, states_ints):
    return x.new_empty((*x.shape[:-1], sum(h[4][0] for h in headers(states_ints))))


@torch.library.custom_op("qlorakit::linear_4bit_cat_grad_input", mutates_args=())
def linear_4bit_cat_grad_input_op(grad_y: Tensor, packed: list[Tensor], states: list[Tensor],
                                  states_ints: list[int]) -> Tensor:
    """dX = dY [W_0; W_1; ...]: grad_y [M, sum N_i] -> [M, K] in grad_y.dtype."""
    return _backend("linear_4bit_cat_grad_input", grad_y)(grad_y, packed, states_of(states, states_ints))


@linear_4bit_cat_grad_input_op.register_fake
def _(grad_y, packed, states, states_ints):
    return grad_y.new_empty((*grad_y.shape[:-1], next(headers(states_ints))[4][1]))


def _save_weights(ctx, packed: list[Tensor], state: list[Tensor], ints: list[int]) -> None:
    ctx.save_for_backward(*packed, *state)
    ctx.n_packed, ctx.ints = len(packed), ints


def _saved_weights(ctx) -> tuple[list[Tensor], list[Tensor], list[int]]:
    saved = ctx.saved_tensors
    return list(saved[:ctx.n_packed]), list(saved[ctx.n_packed:]), ctx.ints


def _no_grads(packed: list[Tensor], states: list[Tensor]) -> tuple[list[None], list[None], None]:
    """What a backward returns for the weights' arguments: none of them gets a gradient (lists for lists)."""
    return [None] * len(packed), [None] * len(states), None


def _linear_setup(ctx, inputs, output):
    _save_weights(ctx, [inputs[1]], inputs[2], inputs[3])


def _linear_backward(ctx, grad_y):
    (packed,), state, ints = _saved_weights(ctx)
    grad_x = linear_4bit_grad_input_op(grad_y, packed, state, ints) if ctx.needs_input_grad[0] else None
    grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[4] else None
    return grad_x, None, [None] * len(state), None, grad_bias


def _linear_grad_input_backward(ctx, v):
    (packed,), state, ints = _saved_weights(ctx)
    return linear_4bit_op(v, packed, state, ints, None), None, [None] * len(state), None


def _cat_setup(ctx, inputs, output):
    _save_weights(ctx, inputs[1], inputs[2], inputs[3])


def _cat_backward(ctx, grad_y):
    packed, states, ints = _saved_weights(ctx)
    return linear_4bit_cat_grad_input_op(grad_y, packed, states, ints), *_no_grads(packed, states)


def _cat_grad_input_backward(ctx, v):
    packed, states, ints = _saved_weights(ctx)
    return linear_4bit_cat_op(v, packed, states, ints), *_no_grads(packed, states)


linear_4bit_op.register_autograd(_linear_backward, setup_context=_linear_setup)
linear_4bit_grad_input_op.register_autograd(_linear_grad_input_backward, setup_context=_linear_setup)
linear_4bit_cat_op.register_autograd(_cat_backward, setup_context=_cat_setup)
linear_4bit_cat_grad_input_op.register_autograd(_cat_grad_input_backward, setup_context=_cat_setup)


def linear_4bit(x: Tensor, packed: Tensor, state: QuantState, bias: Tensor | None = None) -> Tensor:
    tensors, ints = state_args([state])
    return linear_4bit_op(x, packed, tensors, ints, bias)


def linear_4bit_grad_input(grad_y: Tensor, packed: Tensor, state: QuantState) -> Tensor:
    tensors, ints = state_args([state])
    return linear_4bit_grad_input_op(grad_y, packed, tensors, ints)


def linear_4bit_cat(x: Tensor, packed: list[Tensor], states: list[QuantState]) -> Tensor:
    tensors, ints = state_args(states)
    return linear_4bit_cat_op(x, list(packed), tensors, ints)


def linear_4bit_cat_grad_input(grad_y: Tensor, packed: list[Tensor], states: list[QuantState]) -> Tensor:
    tensors, ints = state_args(states)
    return linear_4bit_cat_grad_input_op(grad_y, list(packed), tensors, ints)


# --- the elementwise parts of a Llama block, and the loss --------------------------------------------------------

@torch.library.custom_op("qlorakit::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y [M, H] in promote(weight, x) dtype, rstd [M] fp32) for x [M, H]."""
    return _backend("rms_norm", x)(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), x.new_empty(x.shape[:-1], dtype=_F32)


@torch.library.custom_op("qlorakit::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> Tensor:
    """dx [M, H] in x.dtype for y = rms_norm(x, weight) (weight frozen)."""
    return _backend("rms_norm_backward", dy)(dy, x, weight, rstd)


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape)


@torch.library.custom_op("qlorakit::swiglu", mutates_args=())
def swiglu(gu: Tensor) -> Tensor:
    """gu [M, 2I] = [gate | up] -> silu(gate) * up [M, I] in gu's dtype."""
    return _backend("swiglu", gu)(gu)


@swiglu.register_fake
def _(gu):
    return gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2))


@torch.library.custom_op("qlorakit::swiglu_backward", mutates_args=())
def swiglu_backward(d_act: Tensor, gu: Tensor) -> Tensor:
    """[d gate | d up] [M, 2I] in gu's dtype for d_act [M, I]."""
    return _backend("swiglu_backward", d_act)(d_act, gu)


@swiglu_backward.register_fake
def _(d_act, gu):
    return gu.new_empty(gu.shape)


@torch.library.custom_op("qlorakit::cross_entropy_grad", mutates_args=("logits",))
def cross_entropy_grad(logits: Tensor, targets: Tensor) -> Tensor:
    """The fp32 loss per row [M] of logits [M, V]; the logits are overwritten by softmax - onehot(target)."""
    return _backend("cross_entropy_grad", logits)(logits, targets)


@cross_entropy_grad.register_fake
def _(logits, targets):
    return logits.new_empty(logits.shape[:1], dtype=_F32)


def _own(out: Tensor, source: Tensor) -> Tensor:
    """`out`, or a copy of it when it is a view of `source` (a custom op's outputs must not alias its inputs)."""
    return out.clone() if out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else out


@torch.library.custom_op("qlorakit::qkv_rope", mutates_args=())
def qkv_rope(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int,
             head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """qkv [B, S, (heads + 2 kv_heads) D] -> q [B, heads, S, D], k and v [B, kv_heads, S, D], contiguous, RoPE on q
    and k. (The reference's outputs are views of qkv when B = S = 1; they are copied then.)"""
    q, k, v = _backend("qkv_rope", qkv)(qkv, cos, sin, heads, kv_heads, head_dim)
    return _own(q, qkv), _own(k, qkv), _own(v, qkv)


@qkv_rope.register_fake
def _(qkv, cos, sin, heads, kv_heads, head_dim):
    b, s = qkv.shape[0], qkv.shape[1]
    kv = (b, kv_heads, s, head_dim)
    return qkv.new_empty((b, heads, s, head_dim)), qkv.new_empty(kv), qkv.new_empty(kv)


@torch.library.custom_op("qlorakit::qkv_rope_backward", mutates_args=())
def qkv_rope_backward(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """d qkv [B, S, (heads + 2 kv_heads) D] from the gradients of q, k, v."""
    return _backend("qkv_rope_backward", dq)(dq, dk, dv, cos, sin)


@qkv_rope_backward.register_fake
def _(dq, dk, dv, cos, sin):
    b, heads, s, d = dq.shape
    return dq.new_empty((b, s, (heads + 2 * dk.shape[1]) * d))


# --- the dispatch point's entry ----------------------------------------------------------------------------------

# Operation name -> a function with the backends' arguments that runs the operation's custom op.
WRAPPERS: dict[str, Callable[..., Any]] = {
    "dequantize_4bit": dequantize_4bit, "quantize_4bit": quantize_4bit, "linear_4bit": linear_4bit,
    "linear_4bit_grad_input": linear_4bit_grad_input, "linear_4bit_cat": linear_4bit_cat,
    "linear_4bit_cat_grad_input": linear_4bit_cat_grad_input, "rms_norm": rms_norm,
    "rms_norm_backward": rms_norm_backward, "swiglu": swiglu, "swiglu_backward": swiglu_backward,
    "cross_entropy_grad": cross_entropy_grad, "qkv_rope": qkv_rope, "qkv_rope_backward": qkv_rope_backward,
}


_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack


def tracing() -> bool:
    """True while something traces the program: torch.compile / torch.export (dynamo, which folds
    torch.compiler.is_compiling() to True) or any torch dispatch mode on the stack (make_fx, FakeTensorMode, AOT
    autograd's tracing, a mode that counts or records ops such as FlopCounterMode; torch.profiler is none). Then
    operations go through their custom ops, which such a tracer records as one opaque call each. False in plain
    eager execution."""
    return _is_compiling() or _dispatch_modes() > 0


def call(op: str, *args: Any, **kwargs: Any) -> Any:
    """Run operation `op` (backend arguments, positional or keyword) with the backend chosen for the device of its
    first tensor argument. Eager: the backend function is called directly, exactly as before the ops were custom
    ops (no custom-op dispatch, no QuantState packing). While tracing (`tracing()`): through the op's custom op,
    `torch.ops.qlorakit.<op>`, whose body makes the same choice when it runs."""
    if _is_compiling() or _dispatch_modes():
        return _op_call(op, args, kwargs)
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    if not tensors:
        raise QlorakitError(f"kernels.call({op!r}) got no tensor argument to choose a device from")
    return dispatch.implementation(op, tensors[0].device)[1](*args, **kwargs)


def _op_call(op: str, args: tuple, kwargs: dict) -> Any:
    if not _is_compiling():  # (dynamo folds is_compiling() to True: nothing of this lands in a graph)
        say_once(log, "ops under a dispatch mode",
                 "qlorakit: a torch dispatch mode is active (make_fx, fake tensors, or a mode that records ops), so "
                 "kernels.call runs through the custom ops torch.ops.qlorakit.*: about 10-30 us more host time per "
                 "call than eager execution, which calls the backends directly")
    wrapper = WRAPPERS.get(op)
    if wrapper is None:
        raise QlorakitError(f"unknown operation {op!r}; known: {', '.join(dispatch.OPERATIONS)}")
    if not any(isinstance(a, Tensor) for a in (*args, *kwargs.values())):
        raise QlorakitError(f"kernels.call({op!r}) got no tensor argument to choose a device from")
    return wrapper(*args, **kwargs)
