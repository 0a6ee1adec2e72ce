"""The frozen 4-bit linear layer: a packed NF4/FP4 weight whose state dict is the bitsandbytes layout."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..quant.bnb_format import quant_state_from_tensors, quant_state_to_tensors
from ..quant.double_quant import NestedAbsmax
from ..quant.state import QuantState


class _Linear4bitFn(torch.autograd.Function):
    """Y = X W^T + b with W frozen in 4 bits.

    Saves only references to the packed weight and its (small) quantization state; backward dequantizes W
    again and computes dX = dY W. W gets no gradient; b (frozen by Linear4bit) gets dY summed over all leading
    dimensions only when a caller has made it require grad, rather than silently none.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None):
        ctx.packed, ctx.state = packed, state
        return kernels.call("linear_4bit", x, packed, state, bias)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = kernels.call("linear_4bit_grad_input", grad_y, ctx.packed, ctx.state)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def linear_4bit(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Functional form of Linear4bit.forward: x [..., K] (compute dtype) -> [..., N] in x.dtype."""
    return _Linear4bitFn.apply(x, packed, state, bias)


class Linear4bit(nn.Module):
    """A frozen Linear whose weight [out_features, in_features] is stored packed in 4 bits.

    Buffers (moved by .to()): packed weight uint8 [(N*K+1)//2, 1]; absmax (fp32, or uint8 when double
    quantized) with its nested constants. Its state dict uses bitsandbytes' keys (`weight`, `weight.absmax`,
    `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`,
    `bias`), so transformers + bitsandbytes read what it writes and the reverse.

    Input in any float dtype; under autocast the input is cast to the autocast dtype. Output in the input dtype.
    """

    def __init__(self, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = int(state.shape[0]), int(state.shape[1])
        self._set_state(packed, state)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
        device: torch.device | str | None = None,
    ) -> "Linear4bit":
        """Quantize an nn.Linear's weight (on `device` if given, else where it is)."""
        w = linear.weight.detach()
        if device is not None:
            w = w.to(device)
        packed, state = kernels.call("quantize_4bit", w, blocksize, quant_type, double_quant)
        bias = None if linear.bias is None else linear.bias.detach().to(w.device)
        return cls(packed, state, bias)

    def _apply(self, fn, recurse: bool = True):
        # Device moves reach every buffer, but dtype casts (`.to(torch.bfloat16)`, `.half()`, `.double()`) only
        # reach the bias: casting the fp32 absmax or codebooks would silently change the dequantized weight.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _set_state(self, packed: torch.Tensor, state: QuantState) -> None:
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {list(state.shape)}")
        self.shape, self.dtype = torch.Size(state.shape), state.dtype
        self.blocksize, self.quant_type = state.blocksize, state.quant_type
        self.register_buffer("weight", packed.reshape(-1, 1), persistent=False)
        self.register_buffer("quant_map", state.code, persistent=False)
        if state.nested is not None:
            n = state.nested
            self.nested_blocksize: int | None = n.blocksize
            self.register_buffer("absmax", n.quantized, persistent=False)
            self.register_buffer("nested_absmax", n.absmax, persistent=False)
            self.register_buffer("nested_quant_map", n.code, persistent=False)
            self.register_buffer("nested_offset", n.offset.reshape(()), persistent=False)
        else:
            self.nested_blocksize = None
            self.register_buffer("absmax", state.absmax, persistent=False)
            for name in ("nested_absmax", "nested_quant_map", "nested_offset"):
                self.register_buffer(name, None, persistent=False)

    @property
    def quant_state(self) -> QuantState:
        """A QuantState view of the buffers (no copies). Rebuilt only when a buffer or the dtype changed: it is
        read on every forward, and building it costs more host time than some of the kernels it feeds."""
        b = self._buffers
        key = (self.dtype, b["quant_map"], b["absmax"], b.get("nested_absmax"), b.get("nested_offset"),
               b.get("nested_quant_map"))
        cached = self.__dict__.get("_quant_state_cache")
        if cached is not None and len(cached[0]) == len(key) and all(a is k for a, k in zip(cached[0], key)):
            return cached[1]
        state = self._build_quant_state()
        self.__dict__["_quant_state_cache"] = (key, state)
        return state

    def _build_quant_state(self) -> QuantState:
        nested = None
        if self.nested_blocksize is not None:
            nested = NestedAbsmax(
                self.absmax, self.nested_absmax, self.nested_offset, self.nested_quant_map, self.nested_blocksize
            )
        return QuantState(
            self.shape, self.dtype, self.blocksize, self.quant_type, self.quant_map,
            None if nested is not None else self.absmax, nested,
        )

    @property
    def double_quant(self) -> bool:
        return self.nested_blocksize is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense [out_features, in_features] tensor (default: its original dtype)."""
        return kernels.call("dequantize_4bit", self.weight, self.quant_state, dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        cached = self.dense_copy
        if cached is not None and cached.dtype == x.dtype:
            return torch.nn.functional.linear(x, cached, None if self.bias is None else self.bias.to(x.dtype))
        return linear_4bit(x, self.weight, self.quant_state, self.bias)

    @property
    def dense_copy(self) -> torch.Tensor | None:
        """The dequantized weight [out_features, in_features] that keep_dense_copy keeps, or None."""
        return self.__dict__.get("_dense_cache")

    def keep_dense_copy(self, dtype: torch.dtype | None) -> int:
        """Keep (dtype) or drop (None) a dequantized copy of the weight that forward uses instead of
        dequantizing on every call, for devices without 4-bit kernels. Returns the copy's size in bytes."""
        if dtype is None:
            self.__dict__.pop("_dense_cache", None)
            return 0
        dense = self.dequantize(dtype)
        self.__dict__["_dense_cache"] = dense
        return dense.numel() * dense.element_size()

    def extra_repr(self) -> str:
        dq = f", double_quant(blocksize={self.nested_blocksize})" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq}"
        )

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for key, value in quant_state_to_tensors(prefix, self.weight, self.quant_state).items():
            destination[key] = value if keep_vars else value.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        if not mine:
            missing_keys.append(prefix + "weight")
            return
        packed, state = quant_state_from_tensors(prefix, mine, where=f"state dict at {prefix!r}")
        if state.shape != self.shape:
            error_msgs.append(
                f"size mismatch for {prefix}weight: the checkpoint holds a 4-bit weight of shape "
                f"{list(state.shape)}, this Linear4bit has {list(self.shape)}"
            )
            return
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None and bias is not None and bias.shape != self.bias.shape:
            error_msgs.append(
                f"size mismatch for {prefix}bias: copying a param with shape {list(bias.shape)}, "
                f"the shape in this Linear4bit is {list(self.bias.shape)}"
            )
            return
        device = self.weight.device
        self._set_state(packed.to(device), state.to(device))
        if self.bias is not None:
            if bias is not None:
                with torch.no_grad():
                    self.bias.data = bias.to(device=device, dtype=self.bias.dtype)
            else:
                missing_keys.append(prefix + "bias")
        expected = set(quant_state_to_tensors(prefix, packed, state))
        if self.bias is not None:
            expected.add(prefix + "bias")
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)

    def bits_per_parameter(self) -> float:
        """Stored bits per weight of this layer, counting packed codes and every constant."""
        total = self.weight.numel() * 8 + self.absmax.numel() * self.absmax.element_size() * 8
        if self.double_quant:
            total += self.nested_absmax.numel() * 32 + 32
        return total / math.prod(self.shape)
