"""The check `qlorakit train` makes at start for a 4-bit type other than NF4 (model/quant_type_check.py): sampled
rows of every linear weight, the reference quantizers, `qlorakit inspect`'s parameter-weighted mean. With every row
sampled it is inspect's number exactly (Llama, and GPT-2's transposed Conv1D weights); with few rows it is the
same formula on the rows it names; a pre-quantized folder is one line; the warning says the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qlorakit.errors import CheckpointFormatError
from qlorakit.model.inspect_weights import inspect_model
from qlorakit.model.quant_type_check import MARGIN, TypeComparison, compare_with_nf4, sampled_rows
from qlorakit.quant import dequantize_blocks_4bit, quantize_blocks_4bit

BLOCKSIZE = 64
EVERYTHING = 1 << 40


def save(folder: Path, config) -> Path:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    return save(tmp_path_factory.mktemp("llama"), LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config

    return save(tmp_path_factory.mktemp("gpt2"), GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=32,
                                                            n_positions=64))


@pytest.mark.parametrize("which", ["llama_dir", "gpt2_dir"])
def test_every_row_sampled_is_inspects_mean_exactly(which, request):
    folder = request.getfixturevalue(which)
    means = inspect_model(folder, BLOCKSIZE, progress=False).mean_errors()
    got = compare_with_nf4(folder, "fp4", BLOCKSIZE, budget=EVERYTHING)
    assert (got.error, got.nf4_error) == (means["fp4"], means["nf4"])
    assert got.sampled == got.parameters and got.worse()  # normal weights: FP4 is about a third worse


def rel(w: torch.Tensor, kind: str) -> float:
    packed, absmax = quantize_blocks_4bit(w, BLOCKSIZE, kind)
    restored = dequantize_blocks_4bit(packed, absmax, w.shape, BLOCKSIZE, kind, torch.float32)
    return (torch.linalg.vector_norm(w - restored, dtype=torch.float64)
            / torch.linalg.vector_norm(w, dtype=torch.float64)).item()


def test_a_small_budget_samples_evenly_spaced_rows_of_each_linear(llama_dir):
    budget = 14 * 64 * 3  # 14 linears of 64 or 128 inputs: 3 rows of the 64-wide ones, 1 of down_proj
    got = compare_with_nf4(llama_dir, "fp4", BLOCKSIZE, budget=budget)
    error = nf4 = 0.0
    sampled = parameters = 0
    with safe_open(str(llama_dir / "model.safetensors"), framework="pt") as f:
        for key in sorted(k for k in f.keys() if k.endswith("proj.weight")):
            w = f.get_tensor(key).to(torch.float32)
            k = min(w.shape[0], max(1, budget // (14 * w.shape[1])))
            rows = w[[round(i * (w.shape[0] - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]]
            error += w.numel() * rel(rows, "fp4")
            nf4 += w.numel() * rel(rows, "nf4")
            sampled, parameters = sampled + rows.numel(), parameters + w.numel()
    assert got.sampled == sampled == 12 * 3 * 64 + 2 * 128
    assert got.parameters == parameters and got.linears == 14
    assert got.error == pytest.approx(error / parameters, rel=1e-12)
    assert got.nf4_error == pytest.approx(nf4 / parameters, rel=1e-12)


def test_sampled_rows_are_evenly_spaced_with_both_ends():
    assert sampled_rows(10, 1) == [0]
    assert sampled_rows(10, 2) == [0, 9]
    assert sampled_rows(10, 4) == [0, 3, 6, 9]
    assert sampled_rows(5, 5) == [0, 1, 2, 3, 4]


def test_the_margin_and_the_warning_line():
    close = TypeComparison("fp4", MARGIN * 0.1, 0.1, 100, 1000, 2)
    assert not close.worse()
    far = TypeComparison("fp4", 0.125, 0.0935, 2_039_040, 106_168_320, 210)
    line = far.warning("default")
    assert far.worse() and "\n" not in line
    assert line.startswith("quantization.quant_type fp4 fits this model's weights worse than nf4: mean relative "
                           "error 0.1250 against nf4's 0.0935 (+33.7%, over the 5% margin; 2,039,040 of "
                           "106,168,320 weights of 210 linears sampled)")
    assert line.endswith("; per layer: `qlorakit inspect default`; quantization.quant_type: nf4 has less error "
                         "and silences this")


def test_a_pre_quantized_folder_has_nothing_to_compare(llama_dir, tmp_path):
    from qlorakit.model.quantize_checkpoint import quantize_checkpoint

    out = tmp_path / "nf4"
    quantize_checkpoint(llama_dir, out)
    with pytest.raises(CheckpointFormatError, match="no linear weight stored in 16 or 32 bits"):
        compare_with_nf4(out, "fp4", BLOCKSIZE)
