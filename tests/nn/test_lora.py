"""LoraLinear: y = base(x) + scaling * B(A(dropout(x))), with a frozen base (usually Linear4bit).

Specification: A [r, in] kaiming-uniform(a=sqrt(5)), B [out, r] zeros, so the layer starts as its base;
scaling = alpha / r, or alpha / sqrt(r) with rsLoRA; dropout touches only the LoRA path and only in train mode;
adapters live in `adapter_dtype`, the output is in the input's dtype (the autocast dtype under autocast).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qlorakit.nn import Linear4bit, LoraLinear


@pytest.fixture
def base(make_linear) -> Linear4bit:
    return Linear4bit.from_linear(make_linear(96, 40))


def _with_random_b(lora: LoraLinear, seed: int = 0) -> LoraLinear:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora.lora_B.weight.normal_()
    return lora


@pytest.mark.parametrize("r", [1, 8, 64])
def test_rank_sets_the_adapter_shapes_and_the_names_follow_peft(base, r):
    lora = LoraLinear(base, r=r)
    assert lora.lora_A.weight.shape == (r, 96) and lora.lora_B.weight.shape == (40, r)
    assert lora.lora_A.bias is None and lora.lora_B.bias is None
    assert (lora.in_features, lora.out_features) == (96, 40)
    assert set(lora.state_dict()) >= {"lora_A.weight", "lora_B.weight", "base_layer.weight", "base_layer.bias"}
    assert isinstance(lora.lora_dropout, torch.nn.Identity)


@pytest.mark.parametrize(
    "r, alpha, use_rslora, scaling",
    [(8, 16.0, False, 2.0), (64, 16.0, False, 0.25), (16, 32.0, False, 2.0),
     (8, 16.0, True, 16.0 / math.sqrt(8)), (64, 16.0, True, 2.0)],
)
def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora(base, r, alpha, use_rslora, scaling):
    lora = LoraLinear(base, r=r, alpha=alpha, use_rslora=use_rslora)
    assert lora.scaling == pytest.approx(scaling, rel=1e-15)
    assert f"scaling={scaling:g}" in repr(lora) and f"rslora={use_rslora}" in repr(lora)


def test_scaling_multiplies_the_update(base):
    plain = _with_random_b(LoraLinear(base, r=8, alpha=16.0))
    doubled = LoraLinear(base, r=8, alpha=32.0)
    doubled.load_state_dict(plain.state_dict())
    x = torch.randn(4, 96)
    torch.testing.assert_close(doubled(x) - base(x), 2 * (plain(x) - base(x)), rtol=1e-5, atol=1e-5)


def test_a_is_kaiming_uniform_and_b_is_zero_at_init(base):
    torch.manual_seed(0)
    lora = LoraLinear(base, r=32)
    a = lora.lora_A.weight
    bound = 1.0 / math.sqrt(96)  # kaiming_uniform(a=sqrt(5)): gain sqrt(2 / 6) * sqrt(3 / fan_in)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.99 * bound  # 3072 uniform draws come within 1% of the bound
    assert abs(a.mean().item()) < 0.05 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(lora.lora_B.weight) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_at_init_the_output_is_exactly_the_base_output(base, dtype):
    lora = LoraLinear(base, r=8, adapter_dtype=dtype)
    x = torch.randn(2, 3, 96, dtype=dtype)
    assert torch.equal(lora(x), base(x))


def test_reset_lora_parameters_restores_the_init(base):
    lora = _with_random_b(LoraLinear(base, r=4))
    lora.reset_lora_parameters()
    assert torch.count_nonzero(lora.lora_B.weight) == 0


def test_forward_is_base_plus_scaled_low_rank_update(base):
    lora = _with_random_b(LoraLinear(base, r=8, alpha=16.0))
    x = torch.randn(2, 3, 96)
    expected = base(x) + lora.scaling * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_delta_weight_is_scaling_b_at_a_and_merging_it_reproduces_the_output(base, use_rslora):
    lora = _with_random_b(LoraLinear(base, r=8, alpha=16.0, use_rslora=use_rslora))
    delta = lora.delta_weight()
    assert delta.dtype == torch.float32 and delta.shape == (40, 96)
    assert torch.equal(delta, (lora.lora_B.weight @ lora.lora_A.weight) * lora.scaling)
    x = torch.randn(5, 96)
    merged = F.linear(x, base.dequantize(torch.float32) + delta, base.bias)
    # fp32 sums in a different order: a few ulps of the largest term.
    torch.testing.assert_close(lora(x), merged, rtol=1e-5, atol=1e-4)


# ---- dropout -------------------------------------------------------------------------------------------------


def test_dropout_is_random_in_train_mode_and_off_in_eval_mode(base):
    lora = _with_random_b(LoraLinear(base, r=8, dropout=0.5))
    assert isinstance(lora.lora_dropout, torch.nn.Dropout) and lora.lora_dropout.p == 0.5
    no_dropout = LoraLinear(base, r=8)
    no_dropout.load_state_dict(lora.state_dict())
    x = torch.randn(4, 96)

    assert not torch.equal(lora(x), lora(x))  # train mode (the default): fresh masks

    lora.eval()
    assert torch.equal(lora(x), lora(x))
    assert torch.equal(lora(x), no_dropout(x))


def test_dropout_applies_only_to_the_lora_path(base):
    lora = _with_random_b(LoraLinear(base, r=8, alpha=16.0, dropout=0.3))
    x = torch.randn(4, 96)

    torch.manual_seed(123)
    y = lora(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, p=0.3, training=True)  # the same mask, drawn from the same RNG state

    expected = base(x) + lora.lora_B(lora.lora_A(dropped)) * lora.scaling
    assert torch.equal(y, expected)


def test_dropout_does_not_touch_the_base_output_at_init(base):
    lora = LoraLinear(base, r=8, dropout=0.9)  # B = 0: whatever the mask, the output is the base's
    x = torch.randn(4, 96)
    assert torch.equal(lora(x), base(x))


# ---- dtypes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=["adapter-fp32", "adapter-bf16"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
def test_adapter_dtype_sets_the_parameters_and_the_input_sets_the_output(base, adapter_dtype, input_dtype):
    lora = _with_random_b(LoraLinear(base, r=8, adapter_dtype=adapter_dtype))
    assert lora.lora_A.weight.dtype == adapter_dtype and lora.lora_B.weight.dtype == adapter_dtype
    x = torch.randn(3, 96, dtype=input_dtype, requires_grad=True)
    y = lora(x)
    assert y.dtype == input_dtype
    y.float().sum().backward()
    assert x.grad.dtype == input_dtype
    assert lora.lora_A.weight.grad.dtype == adapter_dtype and lora.lora_B.weight.grad.dtype == adapter_dtype


def test_autocast_runs_in_bf16_with_fp32_input_and_fp32_adapters(base):
    lora = _with_random_b(LoraLinear(base, r=8))
    x = torch.randn(3, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert lora.lora_A.weight.grad.dtype == torch.float32 and lora.lora_B.weight.grad.dtype == torch.float32
    # bf16 compute: each of base and update is rounded to bf16 (relative 2^-8); compare to the fp32 result
    # relative to the output's scale.
    reference = lora(x.detach())
    scale = reference.abs().max().item()
    torch.testing.assert_close(y.float(), reference, rtol=0.0, atol=2e-2 * scale)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_base_bias_is_optional(make_linear, bias):
    base = Linear4bit.from_linear(make_linear(96, 40, bias=bias))
    lora = _with_random_b(LoraLinear(base, r=4))
    x = torch.randn(2, 96)
    y = lora(x)
    expected = F.linear(x, base.dequantize(torch.float32), base.bias) + lora.scaling * (
        x @ lora.lora_A.weight.T @ lora.lora_B.weight.T
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert ("base_layer.bias" in lora.state_dict()) == bias


# ---- invalid options -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -4, 2.5, True])
def test_a_rank_that_is_not_a_positive_integer_is_refused(base, r):
    with pytest.raises(ValueError, match="LoRA rank r must be a positive integer, got"):
        LoraLinear(base, r=r)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan")])
def test_a_dropout_outside_zero_to_one_is_refused(base, dropout):
    with pytest.raises(ValueError, match=r"LoRA dropout must be in \[0, 1\), got"):
        LoraLinear(base, r=4, dropout=dropout)
