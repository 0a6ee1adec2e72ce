"""The 4-bit linear layer and the LoRA layer on it."""

from .linear4bit import Linear4bit, linear_4bit
from .lora import LoraLinear

__all__ = ["Linear4bit", "LoraLinear", "linear_4bit"]
