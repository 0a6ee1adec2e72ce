"""Kernels and the single dispatch point that chooses between them and the PyTorch reference.

The reference implementations always register. The Triton ones register when Triton imports (it ships with
torch on Linux); when it does not, that is logged once here, and QLORAKIT_KERNELS=triton then fails with a
clear error from the dispatch point instead of falling back silently.
"""

import logging

from . import reference as _reference  # noqa: F401  (registers the reference implementations)
from .dispatch import BACKEND_CHOICES, OPERATIONS, SMALL_M_MAX, implementation, register, requested_backend, set_backend
from .dropout_ops import dropout_draw, dropout_replay
from .ops import call, tracing

try:
    from . import triton_block, triton_dequant, triton_loss, triton_matmul, triton_quant, triton_rope  # noqa: F401  (register the Triton implementations)
except ImportError as err:  # no Triton on this platform
    TRITON_IMPORT_ERROR: ImportError | None = err
    logging.getLogger("qlorakit.kernels").warning(
        "qlorakit: the Triton kernels are unavailable (%s); every operation runs on the PyTorch reference", err
    )
else:
    TRITON_IMPORT_ERROR = None


def set_workspace_limit(nbytes: int | None) -> None:
    """Cap the dequantize workspace of the grouped 4-bit matmuls (kernels/triton_matmul.set_workspace_limit;
    None: no cap). Without Triton there is no workspace and this does nothing."""
    if TRITON_IMPORT_ERROR is None:
        triton_matmul.set_workspace_limit(nbytes)


def workspace_limit() -> int | None:
    return None if TRITON_IMPORT_ERROR is not None else triton_matmul.workspace_limit()


__all__ = ["BACKEND_CHOICES", "OPERATIONS", "SMALL_M_MAX", "TRITON_IMPORT_ERROR", "call", "dropout_draw",
           "dropout_replay", "implementation", "register", "requested_backend", "set_backend", "set_workspace_limit",
           "tracing", "workspace_limit"]
