"""Optimizer names as users know them (the bitsandbytes / transformers names) -> a configured AdamW."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .adamw import AdamW
from .errors import OptimizerError

# name -> (state_bits, paged). The pinned-host offload is an AdamW option (paged="pinned"), under the names
# offload_adamw_32bit / offload_adamw_8bit here; the training config lists only the four standard names.
OPTIMIZERS: dict[str, tuple[int, bool | str]] = {
    "paged_adamw_32bit": (32, True),
    "paged_adamw_8bit": (8, True),
    "adamw_32bit": (32, False),
    "adamw_8bit": (8, False),
    "offload_adamw_32bit": (32, "pinned"),
    "offload_adamw_8bit": (8, "pinned"),
}


def build_optimizer(name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                    weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    paged_prefetch: str = "auto") -> AdamW:
    """The optimizer called `name` over `params` (tensors or param-group dicts)."""
    if name not in OPTIMIZERS:
        raise OptimizerError(f"optimizer {name!r} is not known; allowed: {', '.join(OPTIMIZERS)}")
    bits, paged = OPTIMIZERS[name]
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_bits=bits, paged=paged,
                 prefetch=paged_prefetch)
