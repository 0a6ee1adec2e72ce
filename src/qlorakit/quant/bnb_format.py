"""The state-dict layout that transformers + bitsandbytes read and write for a 4-bit Linear.

For a module prefix `p` (e.g. "model.layers.0.self_attn.q_proj.") a quantized weight is stored as:
  p+"weight"                                  uint8 [(N*K + 1) // 2, 1]  packed codes
  p+"weight.absmax"                           uint8 [n_blocks] when nested, else fp32 [n_blocks]
  p+"weight.quant_map"                        fp32 [16]
  p+"weight.nested_absmax"                    fp32 [ceil(n_blocks / 256)]      (nested only)
  p+"weight.nested_quant_map"                 fp32 [256]                       (nested only)
  p+"weight.quant_state.bitsandbytes__<qt>"   uint8: UTF-8 JSON {quant_type, blocksize, dtype, shape,
                                              and when nested: nested_blocksize, nested_dtype, nested_offset}
config.json carries `quantization_config` (see `quantization_config`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from ..errors import CheckpointFormatError, QuantizationError
from .blockwise import check_blocksize, check_quant_type
from .double_quant import NestedAbsmax
from .state import QuantState

QUANT_STATE_KEY = "quant_state.bitsandbytes__"
# What marks a quantized weight in a state dict: "<module>" + WEIGHT_STATE_MARK + "nf4" (or "fp4").
WEIGHT_STATE_MARK = ".weight." + QUANT_STATE_KEY


def quant_state_blob(t: torch.Tensor) -> dict:
    """The JSON record that a `...weight.quant_state.bitsandbytes__<type>` uint8 tensor holds (quant_type,
    blocksize, dtype, shape and the nested settings). ValueError if it is not UTF-8 JSON."""
    return json.loads(bytes(t.to(torch.uint8).cpu().tolist()).decode("utf-8"))
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, where: str = "dtype") -> torch.dtype:
    try:
        return _DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise CheckpointFormatError(
            f"{where}: unknown dtype {name!r}; allowed: {', '.join(_DTYPES)}"
        ) from None


def quant_state_to_tensors(prefix: str, packed: torch.Tensor, state: QuantState) -> dict[str, torch.Tensor]:
    """The bitsandbytes state-dict entries for one quantized weight, keyed with `prefix` + "weight...".

    Tensors are returned as they are (same device); the JSON entry is a new CPU uint8 tensor.
    """
    meta: dict[str, object] = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    out = {prefix + "weight": packed}
    if state.nested is not None:
        nested = state.nested
        out[prefix + "weight.absmax"] = nested.quantized
        out[prefix + "weight.quant_map"] = state.code
        out[prefix + "weight.nested_absmax"] = nested.absmax
        out[prefix + "weight.nested_quant_map"] = nested.code
        meta["nested_blocksize"] = nested.blocksize
        meta["nested_dtype"] = dtype_name(nested.absmax.dtype)
        meta["nested_offset"] = nested.offset.item()
    else:
        assert state.absmax is not None
        out[prefix + "weight.absmax"] = state.absmax
        out[prefix + "weight.quant_map"] = state.code
    blob = json.dumps(meta).encode("utf-8")
    out[prefix + "weight." + QUANT_STATE_KEY + state.quant_type] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return out


def is_quantized_weight(tensors: Mapping[str, object], prefix: str) -> bool:
    """True when `tensors` holds a bitsandbytes 4-bit state for prefix + "weight"."""
    head = prefix + "weight." + QUANT_STATE_KEY
    return any(k.startswith(head) for k in tensors)


def quant_state_from_tensors(
    prefix: str, tensors: Mapping[str, torch.Tensor], where: str = "checkpoint"
) -> tuple[torch.Tensor, QuantState]:
    """Read (packed, QuantState) for prefix + "weight" from bitsandbytes-format tensors.

    Raises CheckpointFormatError naming `where` and the key when an entry is missing or inconsistent.
    """
    head = prefix + "weight." + QUANT_STATE_KEY
    meta_keys = [k for k in tensors if k.startswith(head)]
    if len(meta_keys) != 1:
        raise CheckpointFormatError(f"{where}: expected one {head}<nf4|fp4> entry, found {len(meta_keys)}")
    meta_key = meta_keys[0]

    def need(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CheckpointFormatError(f"{where}: missing {key!r} (needed by {meta_key!r})")
        return tensors[key]

    try:
        meta = quant_state_blob(need(meta_key))
        quant_type, blocksize, shape = meta["quant_type"], int(meta["blocksize"]), torch.Size(meta["shape"])
        dtype = parse_dtype(meta["dtype"], f"{where}: {meta_key} dtype")
        nested_meta = None
        if "nested_blocksize" in meta:
            nested_meta = int(meta["nested_blocksize"]), float(meta["nested_offset"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointFormatError(f"{where}: {meta_key!r} is not valid quantization JSON ({err})") from None
    try:
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        if nested_meta is not None:
            check_blocksize(nested_meta[0], "nested_blocksize")
    except QuantizationError as err:
        raise CheckpointFormatError(f"{where}: {meta_key!r}: {err}") from None
    if meta_key != head + quant_type:
        raise CheckpointFormatError(f"{where}: {meta_key!r} says quant_type {quant_type!r}")
    packed = need(prefix + "weight")
    n = shape.numel()
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise CheckpointFormatError(
            f"{where}: {prefix}weight should be uint8 with {(n + 1) // 2} bytes for shape {list(shape)}, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    code = need(prefix + "weight.quant_map").to(torch.float32)
    absmax = need(prefix + "weight.absmax")
    state = QuantState(shape, dtype, blocksize, quant_type, code)
    if nested_meta is not None:
        nested_blocksize, nested_offset = nested_meta
        state.nested = NestedAbsmax(
            quantized=absmax,
            absmax=need(prefix + "weight.nested_absmax").to(torch.float32),
            offset=torch.tensor(nested_offset, dtype=torch.float32, device=absmax.device),
            code=need(prefix + "weight.nested_quant_map").to(torch.float32),
            blocksize=nested_blocksize,
        )
    else:
        state.absmax = absmax.to(torch.float32)
    if absmax.numel() != state.n_blocks:
        raise CheckpointFormatError(
            f"{where}: {prefix}weight.absmax has {absmax.numel()} entries, expected {state.n_blocks}"
        )
    return packed.reshape(-1, 1), state


def quantization_config(
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: list[str] | None = None,
) -> dict[str, object]:
    """The `quantization_config` entry of config.json that transformers reads as a BitsAndBytesConfig.

    The same keys and values that transformers (5.x) writes for a 4-bit model from BitsAndBytesConfig's defaults,
    including its private `_load_in_4bit` / `_load_in_8bit` copies and the unused 8-bit options.
    """
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
