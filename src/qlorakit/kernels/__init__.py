"""Kernels and the single dispatch point that chooses between them and the PyTorch reference."""

from . import reference as _reference  # noqa: F401  (registers the reference implementations)
from .dispatch import BACKEND_CHOICES, OPERATIONS, call, implementation, register, requested_backend

__all__ = ["BACKEND_CHOICES", "OPERATIONS", "call", "implementation", "register", "requested_backend"]
