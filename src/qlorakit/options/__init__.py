"""The options of `qlorakit quantize`, `generate`, `chat`, `serve`, `pairs`, `inspect` and `eval`: one pydantic model
per command (commands.py), the flags generated from it (flags.py), one-line errors naming the flag (base.py);
`eval --model`'s one-string model specs (model_spec.py)."""

from .base import CommandOptions
from .commands import (ChatOptions, DecodeOptions, EvalOptions, GenerateOptions, InspectOptions, PairsOptions,
                       QuantizeOptions, ServeOptions)
from .flags import add_flags, read_flags

__all__ = ["ChatOptions", "CommandOptions", "DecodeOptions", "EvalOptions", "GenerateOptions", "InspectOptions",
           "PairsOptions", "QuantizeOptions", "ServeOptions", "add_flags", "read_flags"]
