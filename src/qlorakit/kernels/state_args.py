"""A QuantState as custom-op arguments: torch.library ops take tensors, numbers and lists of them, never Python
objects, so the ops in kernels/ops.py receive each quantization state as a list of tensors and a list of ints.

One state is
  tensors  [code, absmax]                                              (plain: absmax fp32 [n_blocks]), or
           [code, absmax, nested_absmax, nested_offset, nested_code]   (double quantized: absmax uint8 [n_blocks]),
  ints     [quant_type, dtype, blocksize, nested_blocksize, ndim, *shape]
where quant_type and dtype are positions in QUANT_TYPES and STATE_DTYPES, and nested_blocksize is 0 for a plain
state. Several states (the weights of linear_4bit_cat) are these lists concatenated, in order. Nothing is
copied: the tensors are the state's own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import QlorakitError
from ..quant.codebooks import QUANT_TYPES
from ..quant.double_quant import NestedAbsmax
from ..quant.state import QuantState

STATE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                         torch.float8_e4m3fn, torch.float8_e5m2)


def header(quant_type: str, dtype: torch.dtype, blocksize: int, nested_blocksize: int,
           shape: Sequence[int]) -> list[int]:
    """The ints of one state (see the module docstring); nested_blocksize 0: not double quantized."""
    if quant_type not in QUANT_TYPES:
        raise QlorakitError(f"quant_type {quant_type!r} cannot be passed to a qlorakit op; allowed: "
                            f"{', '.join(QUANT_TYPES)}")
    if dtype not in STATE_DTYPES:
        raise QlorakitError(f"a quantization state of dtype {dtype} cannot be passed to a qlorakit op; allowed: "
                            f"{', '.join(map(str, STATE_DTYPES))}")
    return [QUANT_TYPES.index(quant_type), STATE_DTYPES.index(dtype), blocksize, nested_blocksize, len(shape),
            *shape]


def state_args(states: Sequence[QuantState]) -> tuple[list[torch.Tensor], list[int]]:
    """(tensors, ints) of `states`, in order."""
    tensors: list[torch.Tensor] = []
    ints: list[int] = []
    for s in states:
        n = s.nested
        if n is not None:
            tensors += [s.code, n.quantized, n.absmax, n.offset, n.code]
        elif s.absmax is not None:
            tensors += [s.code, s.absmax]
        else:
            raise QlorakitError("quantization state has neither absmax nor nested absmax")
        ints += header(s.quant_type, s.dtype, s.blocksize, 0 if n is None else n.blocksize, s.shape)
    return tensors, ints


def headers(ints: Sequence[int]) -> Iterator[tuple[str, torch.dtype, int, int, tuple[int, ...]]]:
    """(quant_type, dtype, blocksize, nested_blocksize, shape) of each state in `ints`."""
    i = 0
    while i < len(ints):
        ndim = ints[i + 4]
        yield (QUANT_TYPES[ints[i]], STATE_DTYPES[ints[i + 1]], ints[i + 2], ints[i + 3],
               tuple(ints[i + 5:i + 5 + ndim]))
        i += 5 + ndim


def states_of(tensors: Sequence[torch.Tensor], ints: Sequence[int]) -> list[QuantState]:
    """The QuantStates that state_args gave (tensors, ints) for; shapes are torch.Size."""
    states, t = [], 0
    for quant_type, dtype, blocksize, nested_blocksize, shape in headers(ints):
        if nested_blocksize:
            code, q8, absmax2, offset, code8 = tensors[t:t + 5]
            nested = NestedAbsmax(q8, absmax2, offset, code8, nested_blocksize)
            states.append(QuantState(torch.Size(shape), dtype, blocksize, quant_type, code, None, nested))
            t += 5
        else:
            code, absmax = tensors[t:t + 2]
            states.append(QuantState(torch.Size(shape), dtype, blocksize, quant_type, code, absmax))
            t += 2
    if t != len(tensors):
        raise QlorakitError(f"quantization state arguments: {len(tensors)} tensors for states that hold {t}")
    return states
