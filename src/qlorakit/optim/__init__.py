"""Optimizers: AdamW with 32-bit or blockwise 8-bit states, in GPU, paged (unified) or pinned host memory."""

from .adamw import AdamW
from .errors import OptimizerError, PagedMemoryError
from .factory import OPTIMIZERS, build_optimizer

__all__ = ["OPTIMIZERS", "AdamW", "OptimizerError", "PagedMemoryError", "build_optimizer"]
