"""The fused 4-bit LoRA autograd function against the composed layers it replaces (its specification)."""

import pytest
import torch

from qlorakit.nn import Linear4bit, LoraLinear
from qlorakit.nn.lora_fused import lora_linear_4bit


def _layer(in_f=96, out_f=40, r=8, dropout=0.0, adapter_dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(in_f, out_f, bias=bias))
    layer = LoraLinear(base, r=r, alpha=16, dropout=dropout, adapter_dtype=adapter_dtype)
    torch.nn.init.normal_(layer.lora_B.weight)  # a nonzero B, so every term of the gradient is exercised
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 96), (2, 5, 96)])
def test_fused_equals_composed_without_dropout(bias, shape):
    layer = _layer(bias=bias)
    assert layer.fused
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape[:-1], 40)
    outs = []
    for fused in (True, False):
        layer.fused = fused
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.backward(g)
        outs.append((y.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_with_and_without_dropout():
    layer = _layer(adapter_dtype=torch.float64)
    base = layer.base_layer
    x = torch.randn(3, 96, dtype=torch.float64, requires_grad=True)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    for p, training in ((0.0, False), (0.4, True)):
        def f(x, a, b):
            torch.manual_seed(123)  # the same dropout mask on every evaluation
            return lora_linear_4bit(x, a, b, base.weight, base.quant_state, None, 2.0, p, training)

        assert torch.autograd.gradcheck(f, (x, a, b), eps=1e-6, atol=1e-6)


def test_dropout_applies_to_the_adapter_path_only():
    layer = _layer(dropout=0.5)
    x = torch.randn(64, 96)
    layer.train()
    with torch.no_grad():
        base_only = layer.base_layer(x)
        y1, y2 = layer(x), layer(x)
        layer.eval()
        y_eval = layer(x)
        layer.lora_B.weight.zero_()
        layer.train()
        y_zero_b = layer(x)
    assert not torch.equal(y1, y2)  # a fresh mask each call in training mode
    torch.testing.assert_close(y_zero_b, base_only)  # with B = 0 the base output is untouched by dropout
    layer.eval()
    assert not torch.equal(y_eval, y1)


def test_saves_no_dequantized_weight():
    layer = _layer(in_f=512, out_f=256, r=4)
    x = torch.randn(8, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert saved, "the function saves x for the adapter gradient"
    assert all(t.numel() != 512 * 256 for t in saved)
