"""PEFT-format adapters: save, load, base-model identity; later merge and export."""

from .peft_format import lora_state_dict, load_adapter, read_adapter, save_adapter

__all__ = ["load_adapter", "lora_state_dict", "read_adapter", "save_adapter"]
