"""Tiny random source checkpoints and what transformers + bitsandbytes make of them, built once per session.

Sources are saved in bf16 with a fixed seed by `save_pretrained(safe_serialization=True)`:
  llama          untied head, one model.safetensors
  llama-sharded  the same architecture in ~50 KB shards with model.safetensors.index.json
  llama-tied     head tied to the input embedding (no lm_head.weight stored)
  gpt2           Conv1D projections (weights stored [in, out]) with biases

The reference is transformers + bitsandbytes quantizing a source on load and writing it with save_pretrained.
On this CPU-only machine that needs nothing special: device_map="cpu" (transformers would also pick the CPU
itself when no accelerator is present) and bitsandbytes 0.50 quantizes with its own CPU kernels for bf16,
fp16 and fp32 inputs. transformers 5 loads with dtype="auto", so every tensor keeps its stored dtype (bf16
here) and the 4-bit states record it; compute_dtype only decides the matmul dtype afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

SOURCES = ("llama", "llama-sharded", "llama-tied", "gpt2")
QUANTS = {
    "nf4-dq": {"quant_type": "nf4", "double_quant": True},
    "fp4": {"quant_type": "fp4", "double_quant": False},
}
SHARD_SIZE = "50KB"
SIDE_FILES = {"tokenizer_config.json": '{"model_max_length": 64}\n', "chat_template.jinja": "{{ messages }}\n"}


def tiny_config(kind: str):
    from transformers import GPT2Config, LlamaConfig

    if kind == "gpt2":
        return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=256, bos_token_id=1,
                          eos_token_id=2)
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, tie_word_embeddings=(kind == "llama-tied"),
    )


def cli_quant_args(quant: str) -> list[str]:
    q = QUANTS[quant]
    args = ["--quant-type", q["quant_type"]]
    return args if q["double_quant"] else [*args, "--no-double-quant"]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `folder` (names must be unique across files)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                assert name not in tensors, f"{name} stored twice"
                tensors[name] = f.get_tensor(name)
    return tensors


def quantization_config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@dataclass
class Reference:
    model: torch.nn.Module  # transformers model with bitsandbytes Linear4bit layers
    folder: Path  # its save_pretrained output
