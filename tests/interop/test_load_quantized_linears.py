"""qlorakit reads checkpoints that transformers + bitsandbytes write: every 4-bit linear dequantizes to exactly
what bitsandbytes itself dequantizes."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from qlorakit.errors import CheckpointFormatError
from qlorakit.model.quantize_checkpoint import load_quantized_linears
from qlorakit.nn import linear4bit
from backend_compare import assert_same_as_reference


def bnb_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize(
    ("kind", "quant"), [("llama", "nf4-dq"), ("llama", "fp4"), ("llama-sharded", "nf4-dq"), ("gpt2", "nf4-dq")]
)
def test_dequantized_weights_equal_bitsandbytes(bnb_reference, kind, quant):
    ref = bnb_reference(kind, quant)
    theirs = bnb_linears(ref.model)
    ours = load_quantized_linears(ref.folder)

    assert set(ours) == set(theirs) and theirs
    for name, module in theirs.items():
        expected = bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state)
        layer = ours[name]
        assert isinstance(layer, linear4bit.Linear4bit)
        assert layer.quant_type == module.weight.quant_state.quant_type
        assert layer.double_quant == bool(module.weight.quant_state.nested)
        got = layer.dequantize()
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert_same_as_reference(got, expected)  # bit-identical on the reference path
        if module.bias is not None:
            assert torch.equal(layer.bias, module.bias.data), name


def test_folder_without_4bit_weights_is_refused(source_dir):
    with pytest.raises(CheckpointFormatError, match="no bitsandbytes 4-bit weights"):
        load_quantized_linears(source_dir("llama"))
