"""Packing changes no loss: a packed batch, with restarting positions and the block-diagonal mask, gives the
same summed token loss as its examples run one by one (a tiny random Llama, fp32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from datahelpers import ALPACA, write_jsonl

from qlorakit.data import epoch_batches, packed_attention_mask, prepare_data


def summed_loss(model, batch, attention_mask):
    logits = model(input_ids=batch["input_ids"], attention_mask=attention_mask,
                   position_ids=batch["position_ids"]).logits
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none")
    return per_token.double().sum()  # summed in float64 so that only the model's fp32 arithmetic is compared


def test_packed_and_unpacked_batches_give_the_same_summed_loss(tmp_path, chatml_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    conversations = [{"messages": [{"role": "user", "content": r["instruction"]},
                                   {"role": "assistant", "content": r["output"]}]} for r in ALPACA]
    conversations.append({"messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "What is two plus two?"},
                                       {"role": "assistant", "content": "Four."},
                                       {"role": "user", "content": "And the capital of France?"},
                                       {"role": "assistant", "content": "Paris."}]})
    data = write_jsonl(tmp_path / "chat.jsonl", conversations)
    examples = prepare_data(data, chatml_tokenizer, fmt="chat", max_seq_length=160, eval_fraction=0.0,
                            cache_dir=None).train
    assert len(examples) == 5

    plan = epoch_batches(examples.lengths, 2, 160, packing=True, seed=0, epoch=0)
    rows = [row for batch in plan for row in batch]
    assert any(len(row) > 1 for row in rows)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(chatml_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=chatml_tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    pad = chatml_tokenizer.pad_token_id
    with torch.no_grad():
        unpacked = sum(summed_loss(model, batch := examples.collate([[i]], pad), batch["attention_mask"])
                       for i in range(len(examples)))
        packed = leaky = 0.0
        for batch_rows in plan:
            batch = examples.collate(batch_rows, pad, pad_to_multiple_of=8)
            packed += summed_loss(model, batch, packed_attention_mask(batch["segment_ids"], torch.float32))
            leaky += summed_loss(model, batch, batch["attention_mask"])
    assert examples.num_target_tokens > 20
    assert abs(float(packed) - float(unpacked)) <= 1e-5, (float(packed), float(unpacked))
    # position_ids alone do not keep packed examples apart: the padding mask lets them attend to each other
    assert abs(float(leaky) - float(unpacked)) > 1e-3
