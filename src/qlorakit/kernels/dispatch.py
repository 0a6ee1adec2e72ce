"""The one dispatch point between the 4-bit layers and whatever computes their operations.

Each operation is declared once here (OPERATIONS); backends register an implementation for it. The plain-PyTorch
reference (`quant/`) is always registered and is the specification; Triton kernels register for CUDA (and run
on CPU tensors under TRITON_INTERPRET=1, which is how CI tests them).

Every operation is also a PyTorch custom op, `torch.ops.qlorakit.<name>` (kernels/ops.py). In eager execution
`kernels.call(op, ...)` calls `implementation(op, device)` below directly (no custom-op cost); while tracing
(torch.compile, torch.export, make_fx, fake tensors: kernels.tracing()) it runs the op, whose body makes the same
call, and whose fake implementation gives the output shapes, dtypes and devices, so the tracer records the op as one
opaque call. A QuantState crosses the op boundary as tensors + ints (kernels/state_args.py). Because the backend is
looked up when the op body runs, a compiled graph holds the op, not a backend, and stays valid whichever backend is
chosen. One fused decoder layer, LoRA dropout included, traces without a graph break on the CPU
(benchmarks/compile_check.py --device cpu); the same check on a GPU is still to be run.

Choice of backend, once per run: `set_backend(...)` from the config's `model.kernels` (`qlorakit train` sets it):
  auto       (default) triton on CUDA tensors when a Triton implementation is registered, else reference;
  reference  always the reference;
  triton     always Triton; an error if an operation has no Triton implementation.
The environment variable QLORAKIT_KERNELS, when set, wins over the config: it is a debugging switch (and how the
test-suite runs every test under each backend). When `auto` does not take the Triton path on a CUDA tensor, that
is said once per operation and reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from ..errors import QlorakitError

log = logging.getLogger("qlorakit.kernels")

BACKEND_CHOICES = ("auto", "reference", "triton")
# Rows of X up to which linear_4bit's fused kernel beats dequantize + cuBLAS (H200, Llama shapes; docs/kernels.md);
# the fused Llama blocks (model/fused_blocks.py) leave such small inputs to transformers' modules.
SMALL_M_MAX = 16
OPERATIONS = ("dequantize_4bit", "linear_4bit", "linear_4bit_grad_input", "linear_4bit_cat",
              "linear_4bit_cat_grad_input", "quantize_4bit", "rms_norm", "rms_norm_backward", "swiglu",
              "swiglu_backward", "cross_entropy_grad", "qkv_rope", "qkv_rope_backward")

_registry: dict[str, dict[str, Callable[..., Any]]] = {op: {} for op in OPERATIONS}
_said: set[tuple[str, str]] = set()


def register(op: str, backend: str, fn: Callable[..., Any] | None = None):
    """Register `fn` as `backend`'s implementation of `op` (usable as a decorator)."""
    if op not in _registry:
        raise ValueError(f"unknown operation {op!r}; known: {', '.join(OPERATIONS)}")

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        _registry[op][backend] = f
        return f

    return wrap if fn is None else wrap(fn)


_chosen = "auto"  # set_backend's choice


def set_backend(choice: str) -> str:
    """Choose the backend for the run (auto | reference | triton); returns the previous choice."""
    global _chosen
    if choice not in BACKEND_CHOICES:
        raise QlorakitError(f"kernels {choice!r} is not allowed; use one of {', '.join(BACKEND_CHOICES)}")
    previous, _chosen = _chosen, choice
    return previous


def requested_backend() -> str:
    """The backend in force: QLORAKIT_KERNELS when set (debugging), else set_backend's choice (default auto)."""
    env = os.environ.get("QLORAKIT_KERNELS", "").strip().lower()
    if not env:
        return _chosen
    if env not in BACKEND_CHOICES:
        raise QlorakitError(f"QLORAKIT_KERNELS={env!r} is not allowed; use one of {', '.join(BACKEND_CHOICES)}")
    return env


def _say_once(op: str, reason: str) -> None:
    if (op, reason) not in _said:
        _said.add((op, reason))
        log.warning("qlorakit: %s runs on the PyTorch reference: %s", op, reason)


def implementation(op: str, device: torch.device) -> tuple[str, Callable[..., Any]]:
    """(backend name, function) that computes `op` for tensors on `device`."""
    impls = _registry.get(op)
    if impls is None:
        raise QlorakitError(f"unknown operation {op!r}; known: {', '.join(OPERATIONS)}")
    choice = requested_backend()
    if choice == "reference":
        return "reference", impls["reference"]
    if "triton" in impls:
        if choice == "triton" or device.type == "cuda":
            return "triton", impls["triton"]
    elif choice == "triton":
        raise QlorakitError(f"QLORAKIT_KERNELS=triton but {op} has no Triton implementation")
    elif device.type == "cuda":
        _say_once(op, "no Triton implementation is available")
    return "reference", impls["reference"]
