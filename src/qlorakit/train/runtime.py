"""Where and in which precision a run computes: device, compute dtype, adapter dtype, autocast."""

from __future__ import annotations

import logging
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..model.build import available_devices, resolve_device  # noqa: F401 - re-exported for callers

log = logging.getLogger("qlorakit.train")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def prefer_expandable_segments() -> bool:
    """Training's CUDA allocator setting, before CUDA starts: expandable segments, unless the user set
    PYTORCH_CUDA_ALLOC_CONF. A training step allocates and frees tensors of many sizes (a layer's recomputed
    activations, the loss chunk, offloaded inputs coming back); with the default allocator the memory it reserved
    beyond what was allocated reached 27% at 4 x 8192 tokens of the 8B shape (benchmarks/results/
    memory_estimate-llama3-8b-h100.json), and NVML counts what is reserved. Expandable segments map pages into one
    growing segment per stream instead. Returns whether this call set it."""
    if os.environ.get(ALLOC_CONF) is not None:
        return False
    os.environ[ALLOC_CONF] = "expandable_segments:True"
    return True


def pick_runtime(compute_dtype: str, adapter_dtype: str, device: str | None = None) -> Runtime:
    """`device` (resolve_device: CUDA when there is one, else CPU). On a GPU without bf16, fall back to fp16
    compute with fp32 adapter master weights, and say so."""
    dev = resolve_device(device, option="device")
    compute = DTYPES[compute_dtype]
    adapter = DTYPES[adapter_dtype]
    if dev.type == "cuda" and compute == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("qlorakit: warning: this GPU has no bf16; computing in fp16 with fp32 adapter master weights "
                    "(watch for overflow: NaN losses mean the learning rate or activations are too large)")
        compute, adapter = torch.float16, torch.float32
    if dev.type == "cuda" and compute == torch.float32:
        log.warning("qlorakit: warning: computing in float32 on a GPU doubles activation memory and halves "
                    "throughput with negligible quality gain; bfloat16 is the usual choice")
    if dev.type == "cpu" and compute != torch.float32:
        log.warning("qlorakit: computing in %s on the CPU; CPUs without native bf16/fp16 matrix units run "
                    "this much slower than float32 (set quantization.compute_dtype: float32)",
                    str(compute).removeprefix("torch."))
    return Runtime(dev, compute, adapter)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
