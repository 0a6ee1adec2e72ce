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


class OptionValueError(QlorakitError, ValueError):
    """A command-line option (or the request field it mirrors) has a value outside what it allows."""


class DeviceError(QlorakitError):
    """The device asked for is not a device name, or not available on this machine."""


class ServeAddressError(QlorakitError):
    """`qlorakit serve` cannot listen on the host and port it was given."""


class OutputDirError(QlorakitError):
    """An output folder is a file, lies under a file, or cannot be created or written."""


class DiskSpaceError(QlorakitError):
    """The disk under an output folder has less free space than the run will write."""


class OutputFolderError(QlorakitError):
    """An output folder cannot be written or replaced without touching files the command did not write."""


class CheckpointWriteError(QlorakitError):
    """A checkpoint or output could not be written (disk full, permissions); what was there before is intact."""


class RunConflictError(QlorakitError):
    """The output folder is in use by another run, or holds a run this one cannot continue exactly."""
