"""Optimizer names as users know them (the bitsandbytes / transformers names) -> a configured AdamW."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .adamw import AdamW
from .errors import OptimizerError
from .in_backward import HostAdamW

# name -> (state_bits, paged). The pinned-host offload is an AdamW option (paged="pinned"), under the names
# offload_adamw_32bit / offload_adamw_8bit here; the training config lists only the four standard names.
OPTIMIZERS: dict[str, tuple[int, bool | str]] = {
    "paged_adamw_32bit": (32, True),
    "paged_adamw_8bit": (8, True),
    "adamw_32bit": (32, False),
    "adamw_8bit": (8, False),
    "offload_adamw_32bit": (32, "pinned"),
    "offload_adamw_8bit": (8, "pinned"),
    # fp32 master copy + moments in pinned host memory, adapters on the GPU in the compute dtype, each adapter
    # stepped inside backward (in_backward.HostAdamW)
    "host_adamw_32bit": (32, "host"),
}


def build_optimizer(name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                    weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    paged_prefetch: str = "auto", compute_dtype: torch.dtype = torch.bfloat16,
                    accumulation: int = 1) -> AdamW | HostAdamW:
    """The optimizer called `name` over `params` (tensors or param-group dicts). `compute_dtype` and
    `accumulation` matter to host_adamw_32bit only: it turns the adapters into `compute_dtype` on their device and
    steps on the last of `accumulation` micro-batches."""
    if name not in OPTIMIZERS:
        raise OptimizerError(f"optimizer {name!r} is not known; allowed: {', '.join(OPTIMIZERS)}")
    bits, paged = OPTIMIZERS[name]
    if paged == "host":
        return HostAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, compute_dtype=compute_dtype,
                         accumulation=accumulation)
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_bits=bits, paged=paged,
                 prefetch=paged_prefetch)
