"""What inference builds the 4-bit base with: the compute dtype for a device, and the quantization the adapters
were trained on (their qlorakit record), so that `generate`, `chat` and `serve` build the base alike."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import AdapterMismatchError

# qlorakit's defaults, the QLoRA paper's: what a base is quantized with when no adapter says otherwise.
DEFAULT_QUANTIZATION: dict[str, Any] = {"load_in_4bit": True, "quant_type": "nf4", "blocksize": 64,
                                        "double_quant": True}


def inference_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype inference runs in on `device`: bf16 on CUDA, fp32 elsewhere (CPUs without bf16 units
    are much faster in fp32)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def trained_quantization(records: dict[str, dict[str, Any]], quant_type: str | None = None) -> dict[str, Any]:
    """load_model's quantization arguments for a base that serves the adapters whose qlorakit records are
    `records` (name -> record; {} for an adapter saved without one): each adapter's LoRA weights compensate the
    quantization of the base it was trained on, so the base is rebuilt that way. Adapters trained on different
    quantizations cannot share one base: AdapterMismatchError names them. `quant_type`, when given and no record
    says otherwise, replaces the default's."""
    quant = dict(DEFAULT_QUANTIZATION)
    if quant_type is not None:
        quant["quant_type"] = quant_type
    keys = ("quant_type", "blocksize", "double_quant")
    seen: dict[tuple, str] = {}
    for name, record in records.items():
        trained = (record or {}).get("quantization") or {}
        if not trained:
            continue
        mine = tuple(trained.get(k, quant[k]) for k in keys)
        if seen and mine not in seen:
            other, theirs = next(iter(seen.items()))
            raise AdapterMismatchError(
                f"adapters {theirs!r} and {name!r} were trained on differently quantized bases "
                f"({_words(other)} vs {_words(mine)}): one server holds one base; serve them separately")
        seen.setdefault(mine, name)
    if seen:
        quant.update(dict(zip(keys, next(iter(seen)))))
    return quant


def _words(q: tuple) -> str:
    quant_type, blocksize, double_quant = q
    return f"{quant_type}, blocksize {blocksize}, {'double' if double_quant else 'no double'} quantization"
