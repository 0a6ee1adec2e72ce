"""Typed errors a user can hit. Each message says what was wrong, where, and what is allowed."""

from __future__ import annotations


class QlorakitError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class QuantizationError(QlorakitError, ValueError):
    """A quantization argument or a quantized tensor is not what the format allows."""


class CheckpointFormatError(QlorakitError):
    """A checkpoint folder or file does not hold what the format requires."""


class QloraConfigError(QlorakitError):
    """A configuration key or value is unknown, of the wrong type, or incompatible with another."""


class DataFormatError(QlorakitError):
    """A dataset file or record does not match its declared format."""


class AdapterMismatchError(QlorakitError):
    """An adapter was trained on another base model."""


class AssetError(QlorakitError):
    """A default model or data set could not be fetched from its registry package, or the package lacks it."""
