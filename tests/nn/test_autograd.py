"""Gradients of the 4-bit linear and the LoRA layer, and what their autograd graphs keep alive.

Specification: the input gradient of Linear4bit is dY W with W the dequantized weight (gradcheck in float64);
LoraLinear's gradients w.r.t. x, lora_A and lora_B are exact (gradcheck); the frozen base gets no gradient;
the graph saves no dense weight, and backward dequantizes W again from the packed codes.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from qlorakit.kernels import dispatch
from qlorakit.nn import Linear4bit, LoraLinear, linear_4bit

# (in_features, out_features, blocksize): odd sizes, in_features not a multiple of the blocksize, an odd
# number of weights (padding nibble) and a short last block.
SHAPES = [
    pytest.param(67, 5, 64, id="67x5-bs64"),
    pytest.param(33, 7, 128, id="33x7-bs128"),
    pytest.param(130, 3, 64, id="130x3-bs64"),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("in_features, out_features, blocksize", SHAPES)
def test_linear4bit_input_gradient_passes_gradcheck(make_linear, in_features, out_features, blocksize, bias):
    layer = Linear4bit.from_linear(make_linear(in_features, out_features, bias=bias), blocksize=blocksize)
    x = torch.randn(1, 2, in_features, dtype=torch.float64, requires_grad=True)
    b = None if layer.bias is None else layer.bias.detach().double()

    def f(x: torch.Tensor) -> torch.Tensor:
        return linear_4bit(x, layer.weight, layer.quant_state, b)

    assert gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_a_bias_made_trainable_gets_its_gradient(make_linear):
    """Linear4bit freezes its bias; a caller who unfreezes it (PEFT's bias="all") gets dY summed, not None."""
    layer = Linear4bit.from_linear(make_linear(67, 5))
    b = layer.bias.detach().double().requires_grad_()
    x = torch.randn(2, 3, 67, dtype=torch.float64)  # leading dims: the gradient sums over all of them
    assert gradcheck(lambda b: linear_4bit(x, layer.weight, layer.quant_state, b), (b,), eps=1e-6, atol=1e-7)

    layer.bias.requires_grad_(True)  # an fp32 bias under bf16 compute: its gradient comes back in fp32
    layer(torch.randn(2, 3, 67, dtype=torch.bfloat16)).float().sum().backward()
    assert layer.bias.grad.dtype == torch.float32 and torch.equal(layer.bias.grad, torch.full((5,), 6.0))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("in_features, out_features, blocksize", SHAPES)
def test_lora_gradients_wrt_x_a_and_b_pass_gradcheck(make_linear, in_features, out_features, blocksize, bias):
    base = Linear4bit.from_linear(make_linear(in_features, out_features, bias=bias), blocksize=blocksize)
    lora = LoraLinear(base, r=2, alpha=6.0, dropout=0.0, adapter_dtype=torch.float64)
    x = torch.randn(1, 2, in_features, dtype=torch.float64, requires_grad=True)
    a = lora.lora_A.weight.detach().clone().requires_grad_()
    b = (0.1 * torch.randn(out_features, 2, dtype=torch.float64)).requires_grad_()  # B = 0 would hide dA

    def f(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional_call(lora, {"lora_A.weight": a, "lora_B.weight": b}, (x,))

    assert gradcheck(f, (x, a, b), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_only_the_adapter_receives_gradients(make_linear):
    base = Linear4bit.from_linear(make_linear(64, 16))
    lora = LoraLinear(base, r=4)
    torch.nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, 64, requires_grad=True)

    lora(x).square().sum().backward()

    assert {name for name, p in lora.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}
    assert {name for name, p in lora.named_parameters() if p.grad is not None} == {"lora_A.weight", "lora_B.weight"}
    assert not base.bias.requires_grad and base.bias.grad is None
    assert not base.weight.requires_grad and base.weight.grad is None  # the packed uint8 buffer
    assert x.grad is not None
    assert lora.lora_A.weight.grad.abs().sum() > 0 and lora.lora_B.weight.grad.abs().sum() > 0


def test_lora_freezes_a_dense_base_too(make_linear):
    base = make_linear(32, 8)
    lora = LoraLinear(base, r=2)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    lora(torch.randn(2, 32)).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None


def test_the_graph_saves_no_dequantized_weight(make_linear):
    """What LoraLinear(Linear4bit) may save for backward: x and A(x) (activations), and the adapter weights
    A [r, in] and B [out, r] (or views of them). The 4-bit function keeps only references to the packed codes
    and constants (not saved tensors); nothing the size of the dense [out, in] weight is saved."""
    in_features = out_features = 1024
    tokens, r = 2 * 16, 8
    base = Linear4bit.from_linear(make_linear(in_features, out_features, dtype=torch.bfloat16))
    lora = LoraLinear(base, r=r, adapter_dtype=torch.bfloat16)
    x = torch.randn(2, 16, in_features, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora(x)

    floats = [t for t in saved if t.is_floating_point()]
    assert floats, "the LoRA path saves its activations"
    assert all(t.numel() != out_features * in_features for t in floats), [tuple(t.shape) for t in floats]
    expected_at_most = tokens * in_features + tokens * r + r * in_features + out_features * r
    assert sum(t.numel() for t in floats) <= expected_at_most
    y.sum().backward()  # the graph is still complete
    assert x.grad is not None and x.grad.shape == x.shape

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base(x).sum().backward()
    assert saved == []  # the 4-bit linear on its own saves no tensor at all


def _record_calls(monkeypatch: pytest.MonkeyPatch, op: str) -> list[tuple]:
    """Wrap every registered implementation of `op` (whichever backend the run uses) so that each dispatched
    call appends its positional arguments to the returned list; monkeypatch restores the registry."""
    calls: list[tuple] = []
    for backend, impl in list(dispatch._registry[op].items()):

        def recording(*args, _impl=impl, **kwargs):
            calls.append(args)
            return _impl(*args, **kwargs)

        monkeypatch.setitem(dispatch._registry[op], backend, recording)
    return calls


def test_backward_dequantizes_the_packed_weight_again(make_linear, monkeypatch):
    base = Linear4bit.from_linear(make_linear(96, 24))
    lora = LoraLinear(base, r=4)
    forward_calls = _record_calls(monkeypatch, "linear_4bit")
    backward_calls = _record_calls(monkeypatch, "linear_4bit_grad_input")

    x = torch.randn(5, 96, requires_grad=True)
    y = lora(x)
    assert (len(forward_calls), len(backward_calls)) == (1, 0)

    y.sum().backward()

    assert (len(forward_calls), len(backward_calls)) == (1, 1)
    grad_y, packed, state = backward_calls[0]
    assert packed is base.weight and packed.dtype == torch.uint8  # from the packed codes, not a dense copy
    assert state.shape == (24, 96)
    torch.testing.assert_close(x.grad, grad_y @ base.dequantize(torch.float32))  # B = 0 at init: no LoRA term


def test_no_input_gradient_no_grad_input_kernel(make_linear, monkeypatch):
    lora = LoraLinear(Linear4bit.from_linear(make_linear(32, 8)), r=2)
    backward_calls = _record_calls(monkeypatch, "linear_4bit_grad_input")
    lora(torch.randn(3, 32)).sum().backward()  # x needs no gradient: only the adapter's are computed
    assert backward_calls == []
    assert lora.lora_A.weight.grad is not None
