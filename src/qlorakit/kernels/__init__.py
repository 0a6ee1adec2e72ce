"""Kernels and the single dispatch point that chooses between them and the PyTorch reference.

The reference implementations always register. The Triton ones register when Triton imports (it ships with
torch on Linux); when it does not, that is logged once here, and QLORAKIT_KERNELS=triton then fails with a
clear error from the dispatch point instead of falling back silently.
"""

import logging

from . import reference as _reference  # noqa: F401  (registers the reference implementations)
from .dispatch import BACKEND_CHOICES, OPERATIONS, call, implementation, register, requested_backend

try:
    from . import triton_block, triton_dequant, triton_loss, triton_matmul, triton_quant, triton_rope  # noqa: F401  (register the Triton implementations)
except ImportError as err:  # no Triton on this platform
    TRITON_IMPORT_ERROR: ImportError | None = err
    logging.getLogger("qlorakit.kernels").warning(
        "qlorakit: the Triton kernels are unavailable (%s); every operation runs on the PyTorch reference", err
    )
else:
    TRITON_IMPORT_ERROR = None

__all__ = ["BACKEND_CHOICES", "OPERATIONS", "TRITON_IMPORT_ERROR", "call", "implementation", "register",
           "requested_backend"]
