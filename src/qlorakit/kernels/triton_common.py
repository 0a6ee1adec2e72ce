"""What every Triton kernel of qlorakit needs from a QuantState: its tensors as kernel arguments, the codebook
tables on the right device (cached, so a launch does no host-to-device copy), and the device check.

Codebook: like the reference (`quant.blockwise.dequantize_blocks_4bit`), the kernels use the canonical
codebook of `state.quant_type`, not `state.code`; the nested (8-bit) map is `state.nested.code`, as in
`quant.double_quant.NestedAbsmax.dequantize`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import QlorakitError
from ..quant.codebooks import code_4bit
from ..quant.state import QuantState

# Offsets are computed in int32 unless a tensor is this large (elements), then in int64.
INT32_LIMIT = 2**31 - 2**20


def interpreting() -> bool:
    """True when Triton kernels run in its interpreter (TRITON_INTERPRET=1, set before they were defined)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(what: str, *tensors: torch.Tensor) -> torch.device:
    """The one device of `tensors`; Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise QlorakitError(f"{what}: tensors on {device} and {t.device}; put them on one device")
    if device.type != "cuda" and not interpreting():
        raise QlorakitError(
            f"{what}: the Triton kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got "
            f"{device}; use kernels auto or reference (model.kernels) for {device.type} tensors"
        )
    return device


@dataclass(frozen=True)
class CodeTables:
    """Per (quant_type, device): code fp32 [16]; for quantization the fp32 midpoints [15] between the sorted
    codes and order int32 [16] (sorted position -> code), computed exactly as the reference computes them."""

    code: torch.Tensor
    midpoints: torch.Tensor
    order: torch.Tensor


@lru_cache(maxsize=None)
def code_tables(quant_type: str, device: torch.device) -> CodeTables:
    # The GEMV forms a lookup's address as table | (4 * code index), which needs a 64-byte aligned table.
    buf = torch.empty(32, dtype=torch.float32, device=device)
    start = (-buf.data_ptr() % 64) // 4
    code = buf[start : start + 16]
    code.copy_(code_4bit(quant_type, device))
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    return CodeTables(code, midpoints.contiguous(), order.to(torch.int32).contiguous())


@dataclass(frozen=True)
class AbsmaxArgs:
    """The absmax constants as kernel arguments. Not nested: `absmax` fp32 [n_blocks] and the others are
    placeholders (never read). Nested: q8 uint8 [n_blocks], code8 fp32 [256], absmax2 fp32 [n_blocks / nested
    blocksize], offset fp32 [1]."""

    nested: bool
    absmax: torch.Tensor
    q8: torch.Tensor
    code8: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    nested_blocksize: int

    def as_args(self) -> tuple[torch.Tensor, ...]:
        return self.absmax, self.q8, self.code8, self.absmax2, self.offset


def _fp32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t if t.is_contiguous() else t.contiguous()


def absmax_args(state: QuantState, device: torch.device) -> AbsmaxArgs:
    """Kernel arguments for the absmax constants (views or the tensors themselves; checks are attribute reads,
    since this runs on every GEMV call)."""
    nested = state.nested
    if nested is not None:
        q8 = nested.quantized
        if q8.dtype != torch.uint8:
            q8 = q8.view(torch.uint8)
        if not q8.is_contiguous():
            q8 = q8.contiguous()
        if q8.device != device:
            raise QlorakitError(f"quantization state on {q8.device}, packed weight on {device}")
        if q8.numel() != state.n_blocks:
            raise QlorakitError(f"nested absmax has {q8.numel()} entries, the state needs {state.n_blocks}")
        absmax2 = _fp32(nested.absmax)
        return AbsmaxArgs(True, absmax2, q8, _fp32(nested.code), absmax2, _fp32(nested.offset), nested.blocksize)
    if state.absmax is None:
        raise QlorakitError("quantization state has neither absmax nor nested absmax")
    absmax = _fp32(state.absmax)
    if absmax.device != device:
        raise QlorakitError(f"quantization state on {absmax.device}, packed weight on {device}")
    if absmax.numel() != state.n_blocks:
        raise QlorakitError(f"absmax has {absmax.numel()} entries, the state needs {state.n_blocks}")
    return AbsmaxArgs(False, absmax, absmax, absmax, absmax, absmax, 256)


def packed_bytes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The packed codes as a contiguous uint8 tensor (any shape) holding at least ceil(numel / 2) bytes."""
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    if packed.numel() < (numel + 1) // 2:
        raise QlorakitError(f"packed weight has {packed.numel()} bytes, {(numel + 1) // 2} needed for {numel} values")
    return packed
