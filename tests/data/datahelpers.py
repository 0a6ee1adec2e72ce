"""Helpers for the data-layer tests: tiny tokenizers built in memory (no hub), data writers, mask readers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Hello world, this is a tiny corpus for the tests.",
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus two? Four. What is the capital of France? Paris.",
    "Give three tips for staying healthy. Eat well, sleep well, and exercise.",
    "### Instruction: ### Input: ### Response: system user assistant",
    "You are a helpful assistant. Translate to French: good morning. Bonjour.",
]

# ChatML as SmolLM2-Instruct writes it, default system prompt included.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_level_bpe(special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2-Instruct-like: no BOS, <|im_end|> is both EOS and pad, ChatML template."""
    tok = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(["<|im_start|>", "<|im_end|>"]),
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def make_plain_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-like base tokenizer: BOS added by its post-processor, distinct EOS and pad, no chat template."""
    backend = _byte_level_bpe(["<s>", "</s>", "<pad>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def target_spans(tokenizer: Any, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """The decoded runs of consecutive positions that carry loss, checking labels equal ids there."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    keep = labels != -100
    assert np.array_equal(labels[keep], ids[keep])
    spans, run = [], []
    for token, k in zip(ids.tolist(), keep.tolist()):
        if k:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tokenizer.decode(s, skip_special_tokens=False) for s in spans]


ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep well."},
    {"instruction": "Translate to French.", "input": "good morning", "output": "Bonjour."},
    {"instruction": "What is two plus two?", "input": "", "output": "Four."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
]
