"""The bitsandbytes state-dict layout of a 4-bit weight: what we write is what bitsandbytes writes, key for key
and byte for byte, each library reads the other's, and malformed entries are refused by name."""

from __future__ import annotations

import json
import re

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn

from qlorakit.errors import CheckpointFormatError
from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.quant import dequantize_4bit, quantize_4bit
from qlorakit.quant.bnb_format import is_quantized_weight, quant_state_from_tensors, quant_state_to_tensors

FORMATS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
FORMAT_IDS = ["nf4-dq", "nf4", "fp4-dq", "fp4"]
PREFIX = "model.layers.0.self_attn.q_proj."


def fp32_linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=True)


def bitsandbytes_layer(linear: nn.Linear, quant_type: str, double_quant: bool) -> bnb.nn.Linear4bit:
    """bitsandbytes' own Linear4bit holding `linear`'s weights, quantized on the CPU by .to('cpu')."""
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=True, compute_dtype=torch.bfloat16,
        compress_statistics=double_quant, quant_type=quant_type,
    )  # fmt: skip
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def json_blob(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def read_blob(blob: torch.Tensor) -> dict:
    return json.loads(bytes(blob.tolist()).decode("utf-8"))


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    # Key order is not part of the format (safetensors sorts keys); the set of keys, dtypes, shapes and values are.
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        a, b = ours[key], theirs[key]
        assert a.dtype == b.dtype, f"{key}: {a.dtype} != bitsandbytes' {b.dtype}"
        assert a.shape == b.shape, f"{key}: {tuple(a.shape)} != bitsandbytes' {tuple(b.shape)}"
        assert torch.equal(a, b), f"{key}: values differ" + (
            f"\n ours:   {bytes(a.tolist())!r}\n theirs: {bytes(b.tolist())!r}" if "quant_state" in key else ""
        )


@pytest.mark.parametrize("shape", [(96, 64), (7, 33), (50, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_linear4bit_state_dict_is_bitsandbytes_state_dict(quant_type, double_quant, shape):
    out_features, in_features = shape
    linear = fp32_linear(in_features, out_features)
    theirs = bitsandbytes_layer(linear, quant_type, double_quant).state_dict(prefix=PREFIX)
    ours = Linear4bit.from_linear(linear, 64, quant_type, double_quant).state_dict(prefix=PREFIX)
    expected_keys = {"weight", "bias", "weight.absmax", "weight.quant_map"}
    expected_keys.add(f"weight.quant_state.bitsandbytes__{quant_type}")
    if double_quant:
        expected_keys |= {"weight.nested_absmax", "weight.nested_quant_map"}
    assert set(theirs) == {PREFIX + k for k in expected_keys}
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("shape", [(1000,), (7, 33), (2, 3, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_quant_state_to_tensors_is_bitsandbytes_as_dict(quant_type, double_quant, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    packed, state = quantize_4bit(x, 64, quant_type, double_quant)
    ours = quant_state_to_tensors(PREFIX, packed, state)
    ref_packed, ref_state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    theirs = {PREFIX + "weight": ref_packed}
    theirs.update({PREFIX + "weight." + k: v for k, v in ref_state.as_dict(packed=True).items()})
    assert_same_tensors(ours, theirs)
    meta = read_blob(ours[PREFIX + f"weight.quant_state.bitsandbytes__{quant_type}"])
    expected = {"quant_type", "blocksize", "dtype", "shape"}
    if double_quant:
        expected |= {"nested_blocksize", "nested_dtype", "nested_offset"}
    assert set(meta) == expected
    assert meta["shape"] == list(shape) and meta["dtype"] == "float32" and meta["blocksize"] == 64


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_we_read_what_bitsandbytes_writes(quant_type, double_quant):
    linear = fp32_linear(33, 7, seed=2)
    layer = bitsandbytes_layer(linear, quant_type, double_quant)
    theirs = layer.state_dict(prefix=PREFIX)
    assert is_quantized_weight(theirs, PREFIX)
    packed, state = quant_state_from_tensors(PREFIX, theirs)
    assert state.shape == (7, 33) and state.dtype == torch.float32
    assert state.quant_type == quant_type and state.blocksize == 64 and (state.nested is not None) == double_quant
    expected = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(dequantize_4bit(packed, state), expected)
    # ... and a Linear4bit loads it into the same weight.
    ours = Linear4bit.from_linear(fp32_linear(33, 7, seed=3), 64, quant_type, double_quant)
    ours.load_state_dict({k.removeprefix(PREFIX): v for k, v in theirs.items()})
    assert torch.equal(ours.dequantize(), expected)
    assert torch.equal(ours.bias, linear.bias.detach())


@pytest.mark.parametrize(("quant_type", "double_quant"), FORMATS, ids=FORMAT_IDS)
def test_bitsandbytes_reads_what_we_write(quant_type, double_quant):
    layer = Linear4bit.from_linear(fp32_linear(64, 48, seed=4), 64, quant_type, double_quant)
    ours = layer.state_dict()
    stats = {k: v for k, v in ours.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=ours["weight"], quantized_stats=stats, device="cpu")
    assert torch.equal(bnbf.dequantize_4bit(param.data, param.quant_state), layer.dequantize())


# ---------------------------------------------------------------------------------------------------------------
# Malformed entries: CheckpointFormatError naming the key
# ---------------------------------------------------------------------------------------------------------------


def written(quant_type: str = "nf4", double_quant: bool = True) -> dict[str, torch.Tensor]:
    x = torch.randn(7, 33, generator=torch.Generator().manual_seed(5))
    return dict(quant_state_to_tensors(PREFIX, *quantize_4bit(x, 64, quant_type, double_quant)))


def refused(tensors: dict[str, torch.Tensor], *fragments: str) -> None:
    with pytest.raises(CheckpointFormatError) as caught:
        quant_state_from_tensors(PREFIX, tensors, where="model.safetensors")
    message = str(caught.value)
    assert "model.safetensors" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    "key", ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"]
)
def test_missing_key(key):
    tensors = written()
    del tensors[PREFIX + key]
    refused(tensors, f"missing '{PREFIX}{key}'")


def test_missing_quant_state_entry():
    tensors = written()
    del tensors[PREFIX + "weight.quant_state.bitsandbytes__nf4"]
    refused(tensors, PREFIX + "weight.quant_state.bitsandbytes__", "found 0")


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_byte_count_of_the_packed_weight(delta):
    tensors = written()
    weight = tensors[PREFIX + "weight"].reshape(-1)
    tensors[PREFIX + "weight"] = torch.cat([weight, weight[:1]]) if delta > 0 else weight[:-1]
    refused(tensors, PREFIX + "weight", "116 bytes", f"got torch.uint8 with {116 + delta}")


def test_packed_weight_of_the_wrong_dtype():
    tensors = written()
    tensors[PREFIX + "weight"] = tensors[PREFIX + "weight"].to(torch.int16)
    refused(tensors, PREFIX + "weight", "uint8", "torch.int16")


def test_wrong_number_of_absmax_constants():
    tensors = written(double_quant=False)
    tensors[PREFIX + "weight.absmax"] = tensors[PREFIX + "weight.absmax"][:-1]
    refused(tensors, PREFIX + "weight.absmax", "expected 4")


@pytest.mark.parametrize(
    "blob",
    [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"quant_type": "nf4"}', b'{"quant_type": "nf4", "blocksize": "x"}'],
    ids=["syntax", "not-utf8", "not-an-object", "missing-fields", "bad-blocksize-type"],
)
def test_bad_json(blob):
    tensors = written()
    key = PREFIX + "weight.quant_state.bitsandbytes__nf4"
    tensors[key] = torch.tensor(list(blob), dtype=torch.uint8)
    refused(tensors, repr(key), "not valid quantization JSON")


def test_nested_offset_missing_from_the_json():
    tensors = written()
    key = PREFIX + "weight.quant_state.bitsandbytes__nf4"
    meta = read_blob(tensors[key])
    del meta["nested_offset"]
    tensors[key] = json_blob(meta)
    refused(tensors, repr(key), "nested_offset")


def test_unknown_quant_type():
    tensors = written()
    meta = read_blob(tensors.pop(PREFIX + "weight.quant_state.bitsandbytes__nf4"))
    key = PREFIX + "weight.quant_state.bitsandbytes__int4"
    tensors[key] = json_blob({**meta, "quant_type": "int4"})
    refused(tensors, repr(key), "'int4'", "nf4, fp4")


def test_quant_type_disagreeing_with_its_key():
    tensors = written()
    key = PREFIX + "weight.quant_state.bitsandbytes__nf4"
    tensors[key] = json_blob({**read_blob(tensors[key]), "quant_type": "fp4"})
    refused(tensors, repr(key), "'fp4'")


@pytest.mark.parametrize(("field", "value"), [("blocksize", 48), ("nested_blocksize", 8192)])
def test_bad_blocksize_in_the_json(field, value):
    tensors = written()
    key = PREFIX + "weight.quant_state.bitsandbytes__nf4"
    tensors[key] = json_blob({**read_blob(tensors[key]), field: value})
    refused(tensors, repr(key), f"{field} {value}", "32 to 4096")


def test_unknown_dtype_in_the_json():
    tensors = written()
    key = PREFIX + "weight.quant_state.bitsandbytes__nf4"
    tensors[key] = json_blob({**read_blob(tensors[key]), "dtype": "float8"})
    refused(tensors, key, "'float8'", "float32, float16, bfloat16")


def test_two_quant_state_entries():
    tensors = written()
    tensors[PREFIX + "weight.quant_state.bitsandbytes__fp4"] = tensors[PREFIX + "weight.quant_state.bitsandbytes__nf4"]
    refused(tensors, PREFIX + "weight.quant_state.bitsandbytes__", "found 2")


def test_is_quantized_weight():
    tensors = written()
    assert is_quantized_weight(tensors, PREFIX)
    assert not is_quantized_weight(tensors, "model.layers.1.self_attn.q_proj.")
    assert not is_quantized_weight({PREFIX + "weight": torch.zeros(3, 3)}, PREFIX)


def test_error_messages_name_the_key_exactly():
    # The prefix may contain regex metacharacters; messages quote keys verbatim.
    tensors = written()
    del tensors[PREFIX + "weight.quant_map"]
    with pytest.raises(CheckpointFormatError, match=re.escape(repr(PREFIX + "weight.quant_map"))):
        quant_state_from_tensors(PREFIX, tensors)
