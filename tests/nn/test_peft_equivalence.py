"""LoraLinear(Linear4bit) against the stack users switch from: bitsandbytes' Linear4bit wrapped by PEFT LoRA.

Both sides start from the same nn.Linear weights and get the same lora_A / lora_B (B nonzero). The packed
weights must be byte-identical (the reference quantizer reproduces bitsandbytes' CPU path); outputs, input
gradients and adapter gradients must agree.

Tolerances: the same math in the same order gives bit-identical results on bitsandbytes' CPU path today, but
its 4-bit GEMM is a different kernel from our dequantize + F.linear and may accumulate in another order (or
use another ISA path) on another machine. So outputs and gradients are compared within one rounding of the
compute dtype plus accumulation-order noise: bf16 rtol 1.6e-2 (two bf16 ulps, 2 * 2^-7 relative), atol
1e-2 x the tensor's largest magnitude; fp32 rtol 1e-5, atol 1e-5 x the largest magnitude.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlorakit.nn import Linear4bit, LoraLinear

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

IN_FEATURES, OUT_FEATURES, R, ALPHA = 200, 96, 8, 16  # 19200 weights: 300 blocks, 2 nested blocks
TOLERANCES = {torch.bfloat16: (1.6e-2, 1e-2), torch.float32: (1e-5, 1e-5)}


class _OneLayer(nn.Module):
    # PEFT picks its bitsandbytes 4-bit LoRA layer only for models that say they are loaded in 4 bits.
    is_loaded_in_4bit = True

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol_fraction = TOLERANCES[dtype]
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    atol = atol_fraction * theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)


def _build_pair(linear: nn.Linear, dtype: torch.dtype, use_rslora: bool):
    has_bias = linear.bias is not None
    theirs_base = bnb.nn.Linear4bit(
        IN_FEATURES, OUT_FEATURES, bias=has_bias, compute_dtype=dtype, compress_statistics=True, quant_type="nf4"
    )
    theirs_base.load_state_dict(linear.state_dict())
    theirs_base = theirs_base.to("cpu")  # bitsandbytes quantizes when the weight moves to a device
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"], use_rslora=use_rslora
    )
    theirs_model = peft.get_peft_model(_OneLayer(theirs_base), config)
    theirs = theirs_model.base_model.model.proj
    assert isinstance(theirs, peft.tuners.lora.Linear4bit)

    ours = LoraLinear(Linear4bit.from_linear(linear), r=R, alpha=ALPHA, use_rslora=use_rslora)

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(7)
        a = torch.empty(R, IN_FEATURES).uniform_(-1, 1) / IN_FEATURES**0.5
        b = 0.05 * torch.randn(OUT_FEATURES, R)
        for module, value in ((theirs.lora_A["default"], a), (theirs.lora_B["default"], b),
                              (ours.lora_A, a), (ours.lora_B, b)):
            assert module.weight.dtype == torch.float32  # both keep fp32 adapters by default
            module.weight.copy_(value)
    return theirs_model, theirs, ours


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_lora_on_linear4bit_matches_peft_on_bitsandbytes(make_linear, dtype, bias, use_rslora):
    linear = make_linear(IN_FEATURES, OUT_FEATURES, bias=bias, dtype=dtype, seed=3)
    theirs_model, theirs, ours = _build_pair(linear, dtype, use_rslora)

    # Same bytes before any forward (bitsandbytes may repack for its CPU inference path afterwards).
    their_weight = theirs.base_layer.weight
    assert torch.equal(ours.base_layer.weight, their_weight.data)
    state = their_weight.quant_state
    assert torch.equal(ours.base_layer.absmax, state.absmax)
    assert torch.equal(ours.base_layer.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.base_layer.nested_offset, state.offset.reshape(()))
    assert ours.scaling == pytest.approx(theirs.scaling["default"], rel=1e-15)

    x = torch.randn(3, 5, IN_FEATURES, dtype=dtype)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs_model(x_theirs)
    _assert_close(y_ours, y_theirs, dtype)

    grad_y = torch.randn_like(y_ours)
    y_ours.backward(grad_y)
    y_theirs.backward(grad_y)
    _assert_close(x_ours.grad, x_theirs.grad, dtype)
    # The adapters are fp32 on both sides, but with bf16 compute their gradients come from bf16 dY and x:
    # the compute dtype's tolerance applies.
    _assert_close(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, dtype)
    _assert_close(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, dtype)
    assert ours.base_layer.bias is None or ours.base_layer.bias.grad is None
