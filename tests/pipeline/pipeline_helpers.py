"""Helpers for the pipeline tests: tiny random model folders (weights + tokenizer), a learnable toy data set,
and run configs small enough for a shared 2-core CPU."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from tiny_tokenizers import make_chatml_tokenizer

ARCHITECTURES = ("llama", "qwen2", "mistral")
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
NUM_LAYERS = 2

# The response every toy record teaches: a short repeated phrase a tiny model learns within a few steps, so eval
# loss on held-out records (same response, other instructions) must fall.
PATTERN = "red green blue red green blue"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded: on a busy 2-core machine a second intra-op thread makes these tiny matmuls
    ten times slower rather than faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_config(arch: str, vocab_size: int):
    """A 2-layer, hidden-64 causal LM config of `arch`. initializer_range 0.1 rather than 0.02: with the frozen
    random head of a 0.02 model, no adapter can raise one logit far above the others, and the loss barely moves."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128,
                  initializer_range=0.1, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":  # q/k/v projections with biases
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=32)
    raise ValueError(f"unknown architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}")


def save_tiny_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A Hugging Face folder: random `arch` weights saved in bf16 as safetensors, plus the tiny ChatML tokenizer
    (EOS = pad = <|im_end|>). Different seeds give different weights of the same shapes."""
    tokenizer = make_chatml_tokenizer()
    config = tiny_config(arch, len(tokenizer))
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    config.bos_token_id = None
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_pattern_data(path: Path, n: int = 40) -> Path:
    """n alpaca records with distinct instructions and the same short response (PATTERN)."""
    records = [{"instruction": f"Say it {i}.", "input": "", "output": PATTERN} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_tree(model_dir: Path, data_path: Path, output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config tree for a fast CPU run (float32 compute, 4-bit base, rank 8, 4 steps, eval before training and
    at the end), with `sections` merged in key by key, e.g. run_tree(..., training={"max_steps": 6}).

    The tokenisation cache goes next to output_dir (output_dir.parent / "token-cache"), not into the user's cache.
    """
    tree: dict[str, Any] = {
        "model": {"name": str(model_dir)},
        "quantization": {"compute_dtype": "float32"},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "output_dir": str(output_dir), "batch_size": 2, "gradient_accumulation": 1, "max_steps": 4,
            "learning_rate": 1e-2, "warmup_ratio": 0.0, "max_grad_norm": 1.0, "bf16": False,
            "optimizer": "adamw_32bit", "gradient_checkpointing": False, "max_seq_length": 64,
            "eval_every": 1000, "save_every": 1000,
        },
        "data": {"path": str(data_path), "eval_fraction": 0.1,
                 "cache_dir": str(Path(output_dir).parent / "token-cache")},
    }
    tree = copy.deepcopy(tree)
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


def write_yaml(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def read_events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    """The records of one event kind ('train' or 'eval') in run_dir/metrics.jsonl, in file order."""
    from qlorakit.train.metrics import read_metrics

    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("event") == event]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from run_dir/metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_events(run_dir, "train")}


def randomize_lora_b(net, scale: float, seed: int) -> None:
    """Give every lora_B a random value (injected adapters start at zero, which would hide the adapter path)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


CHECKPOINT_DAMAGE = {
    "adapter bytes flipped": ("adapter_model.safetensors", "flip"),
    "optimizer bytes flipped": ("optimizer.safetensors", "flip"),
    "rng bytes flipped": ("rng.safetensors", "flip"),
    "optimizer truncated": ("optimizer.safetensors", "truncate"),
    "adapter emptied": ("adapter_model.safetensors", "empty"),
    "batch_index edited": ("trainer_state.json", "batch_index"),
    "python rng state shortened": ("trainer_state.json", "rng"),
}


def damage(path: Path, how: str) -> None:
    """Change a checkpoint file the way a bad disk, an editor or an interrupted copy would."""
    data = bytearray(path.read_bytes())
    if how == "flip":  # same size, valid header: flip bytes in the data part, near the end
        for i in range(len(data) - 64, len(data) - 8, 7):
            data[i] ^= 0x5A
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "batch_index":
        state = json.loads(data)
        state["batch_index"] += 1
        data = bytearray(json.dumps(state, indent=1).encode())
    elif how == "rng":
        state = json.loads(data)
        state["rng"]["python"][1] = state["rng"]["python"][1][:-3]
        data = bytearray(json.dumps(state, indent=1).encode())
    path.write_bytes(bytes(data))


def left_padded_rows(vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of left-padded rows of the given lengths: pad id 0, tokens drawn from 3..vocab-1,
    seeded by the lengths."""
    gen = torch.Generator().manual_seed(sum(lengths))
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, width - n:] = 1
    return ids, mask
