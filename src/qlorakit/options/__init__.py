"""The options of `qlorakit quantize`, `generate`, `chat`, `serve` and `pairs`: one pydantic model per command
(commands.py), the flags generated from it (flags.py), one-line errors naming the flag (base.py)."""

from .base import CommandOptions
from .commands import ChatOptions, DecodeOptions, GenerateOptions, PairsOptions, QuantizeOptions, ServeOptions
from .flags import add_flags, read_flags

__all__ = ["ChatOptions", "CommandOptions", "DecodeOptions", "GenerateOptions", "PairsOptions", "QuantizeOptions",
           "ServeOptions", "add_flags", "read_flags"]
