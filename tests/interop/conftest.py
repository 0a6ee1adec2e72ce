"""Session fixtures for the interop tests: see tiny_checkpoints.py for what they build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_checkpoints import QUANTS, SHARD_SIZE, SIDE_FILES, Reference, tiny_config


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory):
    """source_dir(kind) -> folder of a tiny random bf16 checkpoint (built once)."""
    from transformers import AutoModelForCausalLM

    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            folder = tmp_path_factory.mktemp(f"src-{kind}")
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.bfloat16)
            shard = {"max_shard_size": SHARD_SIZE} if kind == "llama-sharded" else {}
            model.save_pretrained(folder, safe_serialization=True, **shard)
            for name, text in SIDE_FILES.items():
                (folder / name).write_text(text)
            built[kind] = folder
        return built[kind]

    return get


@pytest.fixture(scope="session")
def bnb_reference(source_dir, tmp_path_factory):
    """bnb_reference(kind, quant) -> Reference: transformers + bitsandbytes quantizing source_dir(kind) on load."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    built: dict[tuple[str, str], Reference] = {}

    def get(kind: str, quant: str) -> Reference:
        if (kind, quant) not in built:
            q = QUANTS[quant]
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=q["quant_type"],
                bnb_4bit_use_double_quant=q["double_quant"],
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            model = AutoModelForCausalLM.from_pretrained(
                source_dir(kind), quantization_config=config, device_map="cpu"
            )
            folder = tmp_path_factory.mktemp(f"bnb-{kind}-{quant}")
            shard = {"max_shard_size": SHARD_SIZE} if kind == "llama-sharded" else {}
            model.save_pretrained(folder, **shard)
            built[kind, quant] = Reference(model, folder)
        return built[kind, quant]

    return get
