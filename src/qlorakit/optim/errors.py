"""Errors of the optimizers that a user can hit."""

from __future__ import annotations

from ..errors import QlorakitError


class OptimizerError(QlorakitError, ValueError):
    """An optimizer name, argument or saved state is not what this optimizer allows."""


class PagedMemoryError(QlorakitError, RuntimeError):
    """Paged (unified-memory) or offloaded optimizer states cannot be set up on this machine or card."""
