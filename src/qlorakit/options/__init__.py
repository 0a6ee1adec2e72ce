"""The options of `qlorakit quantize`, `generate`, `chat` and `serve`: one pydantic model per command
(commands.py), the flags generated from it (flags.py), one-line errors naming the flag (base.py)."""

from .base import CommandOptions
from .commands import ChatOptions, DecodeOptions, GenerateOptions, QuantizeOptions, ServeOptions
from .flags import add_flags, read_flags

__all__ = ["ChatOptions", "CommandOptions", "DecodeOptions", "GenerateOptions", "QuantizeOptions", "ServeOptions",
           "add_flags", "read_flags"]
