"""Tiny byte-level BPE tokenizers built in memory (no hub), shared by the data and pipeline tests."""

from __future__ import annotations

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
