"""Where and in which precision a run computes: device, compute dtype, adapter dtype, autocast."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch

log = logging.getLogger("qlorakit.train")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Runtime:
    device: torch.device
    compute_dtype: torch.dtype
    adapter_dtype: torch.dtype

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def memory_gib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return None


def pick_runtime(compute_dtype: str, adapter_dtype: str, device: str | None = None) -> Runtime:
    """CUDA when there is one, else CPU. On a GPU without bf16, fall back to fp16 compute with fp32 adapter
    master weights, and say so."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute = _DTYPES[compute_dtype]
    adapter = _DTYPES[adapter_dtype]
    if dev.type == "cuda" and compute == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("qlorakit: warning: this GPU has no bf16; computing in fp16 with fp32 adapter master weights "
                    "(watch for overflow: NaN losses mean the learning rate or activations are too large)")
        compute, adapter = torch.float16, torch.float32
    if dev.type == "cuda" and compute == torch.float32:
        log.warning("qlorakit: warning: computing in float32 on a GPU doubles activation memory and halves "
                    "throughput with negligible quality gain; bfloat16 is the usual choice")
    if dev.type == "cpu" and compute != torch.float32:
        log.warning("qlorakit: computing in %s on the CPU; CPUs without native bf16/fp16 matrix units run "
                    "this much slower than float32 (set quantization.compute_dtype: float32, training.bf16: false)",
                    str(compute).removeprefix("torch."))
    return Runtime(dev, compute, adapter)
