"""Linear4bit: a frozen nn.Linear whose weight is stored packed in 4 bits (NF4/FP4, optional double quant).

Specification: forward is exactly F.linear with the reference-dequantized weight; the state dict is the
bitsandbytes layout and survives a round trip; dtype casts never touch the packed codes or the fp32 constants.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from qlorakit.nn import Linear4bit
from qlorakit.quant import dequantize_4bit, quantize_4bit

from backend_compare import assert_same_as_reference

FORMATS = [
    pytest.param(qt, dq, bs, id=f"{qt}-{'dq' if dq else 'nodq'}-bs{bs}")
    for qt, dq, bs in itertools.product(("nf4", "fp4"), (True, False), (64, 128))
]


@pytest.mark.parametrize("quant_type, double_quant, blocksize", FORMATS)
def test_from_linear_stores_the_reference_quantization(make_linear, quant_type, double_quant, blocksize):
    linear = make_linear(200, 48)  # 9600 weights: 150 blocks of 64, 75 of 128
    layer = Linear4bit.from_linear(linear, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    packed, state = quantize_4bit(linear.weight.detach(), blocksize, quant_type, double_quant)

    assert (layer.in_features, layer.out_features, layer.shape) == (200, 48, torch.Size([48, 200]))
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == (quant_type, blocksize, double_quant)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (48 * 200 // 2, 1)
    assert torch.equal(layer.weight, packed)
    assert torch.equal(layer.dequantize(), dequantize_4bit(packed, state))
    if double_quant:
        assert layer.absmax.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
        assert torch.equal(layer.absmax, state.nested.quantized)
    else:
        assert layer.absmax.dtype == torch.float32 and layer.nested_absmax is None
        assert torch.equal(layer.absmax, state.absmax)
    assert not layer.bias.requires_grad
    assert torch.equal(layer.bias, linear.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quant_type, double_quant, blocksize", FORMATS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_is_exactly_linear_with_the_dequantized_weight(
    make_linear, quant_type, double_quant, blocksize, dtype, bias
):
    linear = make_linear(200, 48, bias=bias, dtype=dtype)
    layer = Linear4bit.from_linear(linear, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    x = torch.randn(3, 5, 200, dtype=dtype)

    y = layer(x)

    expected = F.linear(x, dequantize_4bit(layer.weight, layer.quant_state, dtype), linear.bias)
    assert y.dtype == dtype and y.shape == (3, 5, 48)
    assert_same_as_reference(y, expected)


def test_output_follows_the_input_dtype_not_the_stored_dtype(make_linear):
    layer = Linear4bit.from_linear(make_linear(64, 16, dtype=torch.bfloat16))
    x = torch.randn(4, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    assert_same_as_reference(y, F.linear(x, layer.dequantize(torch.float32), layer.bias.float()))


def test_odd_number_of_weights_and_a_short_last_block(make_linear):
    # 67 * 5 = 335 weights: the packed tensor ends in a padding nibble and the last block holds 15 values.
    linear = make_linear(67, 5)
    layer = Linear4bit.from_linear(linear)
    assert layer.weight.shape == (168, 1)
    x = torch.randn(2, 67)
    assert_same_as_reference(layer(x), F.linear(x, layer.dequantize(torch.float32), linear.bias))


def test_dequantize_defaults_to_the_original_dtype_and_shape(make_linear):
    layer = Linear4bit.from_linear(make_linear(128, 32, dtype=torch.bfloat16))
    w = layer.dequantize()
    assert w.dtype == torch.bfloat16 and w.shape == (32, 128)
    w32 = layer.dequantize(torch.float32)
    assert_same_as_reference(w, w32.to(torch.bfloat16))  # fp32 product rounded once either way
    # NF4 round-to-nearest: an error is at most half the widest code gap, (1 - 0.696) / 2 < 0.16, times absmax.
    original = make_linear(128, 32, dtype=torch.bfloat16).weight.float()
    assert (w32 - original).abs().max() <= 0.16 * original.abs().max()


def test_functional_form_matches_the_module(make_linear):
    from qlorakit.nn import linear_4bit

    layer = Linear4bit.from_linear(make_linear(64, 8))
    x = torch.randn(3, 64)
    assert torch.equal(linear_4bit(x, layer.weight, layer.quant_state, layer.bias), layer(x))


def test_autocast_runs_in_the_autocast_dtype(make_linear):
    layer = Linear4bit.from_linear(make_linear(64, 8))
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_same_as_reference(y, F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16()))


def test_extra_repr_names_shape_format_and_double_quant(make_linear):
    layer = Linear4bit.from_linear(make_linear(64, 8, bias=False), blocksize=128, quant_type="fp4")
    assert repr(layer) == (
        "Linear4bit(in_features=64, out_features=8, bias=False, quant_type=fp4, blocksize=128, "
        "double_quant(blocksize=256))"
    )
    plain = Linear4bit.from_linear(make_linear(64, 8), double_quant=False)
    assert plain.extra_repr() == "in_features=64, out_features=8, bias=True, quant_type=nf4, blocksize=64"


def test_rejects_a_weight_that_is_not_2d():
    packed, state = quantize_4bit(torch.randn(4, 8, 16))
    with pytest.raises(ValueError, match="2-D weight"):
        Linear4bit(packed, state)


# ---- dtype casts and device moves -------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize(
    "cast",
    [
        pytest.param(lambda m: m.to(torch.bfloat16), id="to-bf16"),
        pytest.param(lambda m: m.to(torch.float64), id="to-fp64"),
        pytest.param(lambda m: m.half(), id="half"),
        pytest.param(lambda m: m.double(), id="double"),
        pytest.param(lambda m: m.to("cpu", torch.float16), id="to-cpu-fp16"),
        pytest.param(lambda m: m.type(torch.float16), id="type-fp16"),
    ],
)
def test_float_casts_change_only_the_bias(make_linear, double_quant, cast):
    layer = Linear4bit.from_linear(make_linear(200, 24), double_quant=double_quant)
    buffers = {name: buf.clone() for name, buf in layer.named_buffers()}
    weight = layer.dequantize(torch.float32)

    out = cast(layer)

    assert out is layer
    for name, buf in layer.named_buffers():
        assert buf.dtype == buffers[name].dtype, name
        assert torch.equal(buf, buffers[name]), name
    assert torch.equal(layer.dequantize(torch.float32), weight)
    assert layer.bias.dtype != torch.float32 and not layer.bias.requires_grad
    sd = layer.state_dict()
    assert sd["weight"].dtype == torch.uint8 and sd["weight.quant_map"].dtype == torch.float32


def test_device_moves_still_reach_every_buffer(make_linear):
    layer = Linear4bit.from_linear(make_linear(64, 8)).to("meta")
    assert all(buf.device.type == "meta" for buf in layer.buffers())
    assert layer.bias.device.type == "meta"
    assert layer.weight.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32


# ---- state dict --------------------------------------------------------------------------------------------

BNB_KEYS = {
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    "bias",
}


def test_state_dict_uses_the_bitsandbytes_keys(make_linear):
    sd = Linear4bit.from_linear(make_linear(64, 8)).state_dict()
    assert set(sd) == BNB_KEYS
    no_dq = Linear4bit.from_linear(make_linear(64, 8, bias=False), double_quant=False, quant_type="fp4")
    assert set(no_dq.state_dict()) == {"weight", "weight.absmax", "weight.quant_map",
                                       "weight.quant_state.bitsandbytes__fp4"}


@pytest.mark.parametrize("quant_type, double_quant, blocksize", FORMATS)
def test_state_dict_round_trip_into_a_fresh_layer(make_linear, quant_type, double_quant, blocksize):
    source = Linear4bit.from_linear(make_linear(200, 24, seed=1), blocksize, quant_type, double_quant)
    # A fresh layer of the same shape in a different format: loading adopts the checkpoint's format.
    target = Linear4bit.from_linear(make_linear(200, 24, seed=2), 256, "nf4", not double_quant)

    result = target.load_state_dict(source.state_dict())

    assert not result.missing_keys and not result.unexpected_keys
    assert (target.quant_type, target.blocksize, target.double_quant) == (quant_type, blocksize, double_quant)
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(3, 200)
    assert torch.equal(target(x), source(x))


def test_loading_a_different_shape_is_an_error(make_linear):
    target = Linear4bit.from_linear(make_linear(64, 8))
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\[16, 64\].*\[8, 64\]"):
        target.load_state_dict(Linear4bit.from_linear(make_linear(64, 16)).state_dict())
    assert target.shape == (8, 64)


def test_a_bias_the_layer_does_not_have_is_unexpected_not_dropped(make_linear):
    target = Linear4bit.from_linear(make_linear(64, 8, bias=False))
    with pytest.raises(RuntimeError, match="Unexpected key.*bias"):
        target.load_state_dict(Linear4bit.from_linear(make_linear(64, 8)).state_dict())


def test_a_missing_bias_is_reported(make_linear):
    target = Linear4bit.from_linear(make_linear(64, 8))
    sd = Linear4bit.from_linear(make_linear(64, 8, bias=False)).state_dict()
    result = target.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["bias"]


def test_state_dict_round_trip_inside_a_parent_module(make_linear):
    parent = torch.nn.Sequential(Linear4bit.from_linear(make_linear(64, 8, seed=1)), torch.nn.ReLU())
    fresh = torch.nn.Sequential(Linear4bit.from_linear(make_linear(64, 8, seed=2)), torch.nn.ReLU())
    fresh.load_state_dict(parent.state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), parent(x))


# ---- interchange with bitsandbytes ---------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_loads_into_bitsandbytes_and_back(make_linear, quant_type, double_quant):
    """bitsandbytes' Linear4bit.load_state_dict does not read the quantization entries (strict loading calls
    every `weight.*` key unexpected; an unquantized layer also refuses the packed weight's shape). A
    prequantized state dict is loaded the way transformers does it: Params4bit.from_prequantized(packed,
    {every "weight.*" entry}). That is what is checked here, and the way back through our load_state_dict."""
    bnb = pytest.importorskip("bitsandbytes")
    linear = make_linear(200, 24)
    ours = Linear4bit.from_linear(linear, quant_type=quant_type, double_quant=double_quant)
    sd = ours.state_dict()

    theirs = bnb.nn.Linear4bit(200, 24, bias=True, compute_dtype=torch.float32, quant_type=quant_type)
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=theirs)
    theirs.bias = torch.nn.Parameter(sd["bias"].clone(), requires_grad=False)

    assert theirs.weight.quant_state.nested == double_quant
    dequantized = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    assert_same_as_reference(ours.dequantize(), dequantized)
    x = torch.randn(3, 200, requires_grad=True)  # requires_grad keeps bitsandbytes off its CPU repacking path
    assert_same_as_reference(ours(x), theirs(x))

    back = Linear4bit.from_linear(make_linear(200, 24, seed=5))
    back.load_state_dict(theirs.state_dict())
    for name, value in sd.items():
        assert torch.equal(back.state_dict()[name], value), name
