"""The 'triton' linear_4bit / linear_4bit_grad_input: the path rule, the workspace, and the nn layer through them.

Specification: X of 1 row takes the GEMV, 2..SMALL_M_MAX rows the fused kernel, more rows (and fp64, and any call
autograd records) dequantize W into a buffer then call torch's matmul; the result is Y = X W^T + b with W the
reference's dequantized weight. The dense W goes into one reused buffer per (device, dtype, stream), never into
a tensor that autograd saves: a call recorded by autograd gets a fresh W, so a later call cannot change the
gradient. With QLORAKIT_KERNELS=triton, nn.Linear4bit's forward and backward run through these implementations
and match the reference path (exactly where both multiply the same W with torch; within fp32 rounding for the
GEMV and fused kernels).
"""

from __future__ import annotations

import pytest
import torch

from qlorakit import kernels
from qlorakit.kernels import dispatch, triton_matmul
from qlorakit.kernels.triton_dequant import dequantize_4bit_triton
from qlorakit.nn import Linear4bit
from qlorakit.quant.state import dequantize_4bit, quantize_4bit

CPU = torch.device("cpu")


def quantized(n_out: int, k: int, seed: int = 0, blocksize: int = 64):
    gen = torch.Generator().manual_seed(seed)
    return quantize_4bit(torch.randn(n_out, k, generator=gen), blocksize, "nf4", True)


@pytest.fixture
def fresh_workspace():
    triton_matmul.release_workspace()
    yield
    triton_matmul.release_workspace()


def test_every_operation_has_a_triton_implementation():
    assert kernels.TRITON_IMPORT_ERROR is None
    for op in dispatch.OPERATIONS:
        assert "triton" in dispatch._registry[op], op


@pytest.mark.parametrize(
    "rows, dtype, expected",
    [
        (1, torch.bfloat16, "gemv"),
        (1, torch.float32, "gemv"),
        (2, torch.float16, "fused"),
        (triton_matmul.SMALL_M_MAX, torch.bfloat16, "fused"),
        (triton_matmul.SMALL_M_MAX + 1, torch.bfloat16, "dequant_matmul"),
        (4096, torch.bfloat16, "dequant_matmul"),
        (1, torch.float64, "dequant_matmul"),
    ],
)
def test_the_path_rule(rows, dtype, expected):
    assert triton_matmul.plan(rows, dtype) == expected
    assert triton_matmul.plan(rows, dtype, recording=True) == "dequant_matmul"


@pytest.mark.parametrize("lead_shape", [(1,), (1, 1), (2, 3), (4, 5), (21,)], ids=str)
def test_linear_matches_the_reference_for_every_path(fresh_workspace, lead_shape):
    packed, state = quantized(24, 128)
    w = dequantize_4bit(packed, state, torch.float32)
    x = torch.randn(*lead_shape, 128)
    b = torch.randn(24)
    y = triton_matmul.linear_4bit_triton(x, packed, state, b)
    assert y.shape == (*lead_shape, 24)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_grad_input_matches_the_reference(fresh_workspace):
    packed, state = quantized(24, 100)  # K not a multiple of the blocksize
    grad_y = torch.randn(3, 7, 24)
    expected = grad_y @ dequantize_4bit(packed, state, torch.float32)
    assert torch.equal(triton_matmul.linear_4bit_grad_input_triton(grad_y, packed, state), expected)


def test_the_workspace_is_reused_and_grows_once(fresh_workspace):
    small, large = quantized(16, 64), quantized(32, 128, seed=1)
    with torch.no_grad():
        w1 = triton_matmul.dense_weight(*small, torch.float32)
        ptr = w1.data_ptr()
        assert triton_matmul.dense_weight(*quantized(16, 64, seed=2), torch.float32).data_ptr() == ptr
        w2 = triton_matmul.dense_weight(*large, torch.float32)  # grows to the larger weight
        assert torch.equal(w2, dequantize_4bit_triton(*large, torch.float32))
        assert triton_matmul.dense_weight(*small, torch.float32).data_ptr() == w2.data_ptr()
        assert triton_matmul.workspace_bytes() == 32 * 128 * 4
        triton_matmul.dense_weight(*small, torch.bfloat16)  # one buffer per dtype
        assert triton_matmul.workspace_bytes() == 32 * 128 * 4 + 16 * 64 * 2


def test_a_call_recorded_by_autograd_keeps_its_own_weight(fresh_workspace):
    (p1, s1), (p2, s2) = quantized(24, 256, seed=1), quantized(24, 256, seed=2)
    x = torch.randn(20, 256, requires_grad=True)  # 20 rows: the dequantize + matmul path
    y = kernels.call("linear_4bit", x, p1, s1)
    with torch.no_grad():
        kernels.call("linear_4bit", torch.randn(20, 256), p2, s2)  # overwrites the workspace
    grad_y = torch.randn(20, 24)
    y.backward(grad_y)
    assert torch.equal(x.grad, grad_y @ dequantize_4bit(p1, s1, torch.float32))


@pytest.mark.parametrize("lead_shape", [(1, 1), (2, 3), (3, 7)], ids=["gemv", "fused", "dequant-matmul"])
def test_linear4bit_runs_through_triton_and_matches_the_reference(monkeypatch, make_linear_4bit, lead_shape):
    layer = make_linear_4bit()
    calls: list[str] = []
    for op in ("linear_4bit", "linear_4bit_grad_input"):
        impl = dispatch._registry[op]["triton"]

        def spy(*args, _impl=impl, _op=op, **kwargs):
            calls.append(_op)
            return _impl(*args, **kwargs)

        monkeypatch.setitem(dispatch._registry, op, {**dispatch._registry[op], "triton": spy})

    def run(backend: str):
        monkeypatch.setenv("QLORAKIT_KERNELS", backend)
        x = torch.randn(*lead_shape, layer.in_features, generator=torch.Generator().manual_seed(3),
                        requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad

    y_ref, gx_ref = run("reference")
    assert calls == []
    monkeypatch.setenv("QLORAKIT_KERNELS", "triton")
    assert kernels.implementation("linear_4bit", CPU)[0] == "triton"
    assert kernels.implementation("linear_4bit_grad_input", CPU)[0] == "triton"
    y, gx = run("triton")
    assert calls == ["linear_4bit", "linear_4bit_grad_input"]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gx, gx_ref)  # both: the same W, then torch's matmul


@pytest.fixture
def make_linear_4bit():
    def make() -> Linear4bit:
        gen = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(96, 40)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(40, 96, generator=gen) * 0.1)
            linear.bias.copy_(torch.randn(40, generator=gen))
        packed, state = quantize_4bit(linear.weight.detach(), 32, "nf4", True)
        return Linear4bit(packed, state, linear.bias.detach())

    return make
