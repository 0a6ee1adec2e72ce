"""What the `qlorakit eval` tests build: a small alpaca data file with varied answers, a local multiple-choice
task (YAML + JSON, read by lm-evaluation-harness from disk), and the references the command is held equal to: the
response-token loss computed directly with transformers, and tiny Llama models whose linears hold the dequantized
NF4 weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

NF4_RECORD = {"load_in_4bit": True, "quant_type": "nf4", "blocksize": 64, "double_quant": True,
              "compute_dtype": "float32"}
MC_TASK = "tiny_mc"
MC_ITEMS = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_ANSWERS = ["The quick brown fox jumps over the lazy dog.", "Paris.", "Four.", "Eat well, sleep well, and exercise.",
            "Bonjour.", "Hello world, this is a tiny corpus.", "red green blue", "Two plus two is four."]


def write_alpaca_data(path: Path, n: int = 12) -> Path:
    """n alpaca records (a third with an input) whose answers differ in content and length."""
    records = [{"instruction": f"Question {i}: what would you say?", "input": "for the tests" if i % 3 == 0 else "",
                "output": _ANSWERS[i % len(_ANSWERS)]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_mc_task(folder: Path) -> Path:
    """MC_TASK: MC_ITEMS questions with four one-word choices each, the answer at varying positions; the YAML reads
    the JSON by its absolute path."""
    words = ["red", "green", "blue", "fox", "dog", "world", "Paris", "four"]
    items = []
    for i in range(MC_ITEMS):
        choices = [words[(i + k * 3) % len(words)] for k in range(4)]
        items.append({"question": f"Which word comes next in the tiny corpus, number {i}?", "choices": choices,
                      "answer": i % 4})
    data = folder / "tiny_mc.json"
    data.write_text(json.dumps(items), encoding="utf-8")
    (folder / "tiny_mc.yaml").write_text(f"""task: {MC_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""", encoding="utf-8")
    return folder


def hf_model(folder: Path, nf4: bool = False) -> torch.nn.Module:
    """transformers' own model of `folder` in fp32; with nf4, each block linear's weight replaced by its NF4
    quantization (blocksize 64, double quantization), dequantized to fp32, as the loader quantizes the stored
    bf16 weight."""
    from transformers import AutoModelForCausalLM

    from qlorakit.nn.linear4bit import Linear4bit

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if nf4:
        stored = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        for name, module in stored.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                quantized = Linear4bit.from_linear(module, blocksize=64, quant_type="nf4", double_quant=True)
                model.get_submodule(name).weight.data.copy_(quantized.dequantize(torch.float32))
    return model


@torch.no_grad()
def direct_loss(model: torch.nn.Module, examples) -> tuple[float, int]:
    """(mean loss, target tokens) of `examples` (TokenizedExamples): each example alone through the model's forward,
    its fp32 logits' log-softmax at every target, the negative log-probabilities summed in float64."""
    total, count = 0.0, 0
    for i in range(len(examples)):
        ids, labels = (torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in examples.get(i))
        logits = model(input_ids=ids[None]).logits[0].float()
        targets = labels[1:]
        keep = targets != -100
        logp = torch.log_softmax(logits[:-1][keep], dim=-1).gather(1, targets[keep][:, None])
        total += -float(logp.double().sum())
        count += int(keep.sum())
    return total / count, count
