"""How HostAdamW (in_backward.py) lays out its tensors: buckets in backward's order, aligned slices of flat
pinned buffers, two GPU staging slots. The estimator (memory/) reads the sizes from here, so they agree."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

ALIGN = 64  # elements: each tensor's slice of the flat buffers starts 256-byte aligned
BUCKET_NUMEL = 4 * 2**20  # elements per bucket (a Llama-2-70B layer's r=64 adapters are 10.4 M in 14 tensors)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_buckets(numels: list[int], bucket_numel: int = BUCKET_NUMEL) -> list[list[int]]:
    """Indices of the trainable tensors (in parameter order) grouped into buckets, in the order backward is
    expected to finish them: from the last tensor to the first, a bucket closing before it would pass
    `bucket_numel` aligned elements (a larger tensor gets a bucket of its own)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in reversed(range(len(numels))):
        n = _align(numels[i])
        if current and size + n > bucket_numel:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        buckets.append(current)
    return buckets


def host_bytes(numels: list[int], accumulation: int) -> int:
    """Pinned host bytes of HostAdamW's flat buffers: master, two moments (and the gradient sum), aligned."""
    return (4 if accumulation > 1 else 3) * 4 * sum(_align(n) for n in numels)


def staging_bytes(numels: list[int], accumulation: int, bucket_numel: int = BUCKET_NUMEL) -> int:
    """GPU bytes of the two staging slots HostAdamW allocates on CUDA for tensors of `numels` elements."""
    span = max((sum(_align(numels[i]) for i in b) for b in plan_buckets(numels, bucket_numel)), default=0)
    return 2 * (4 if accumulation > 1 else 3) * span * 4


@dataclass
class _Bucket:
    index: int
    params: list[torch.Tensor]
    offsets: list[int]  # each tensor's start, relative to the bucket's start in the flat buffers
    start: int
    span: int
    ready: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> its gradient, until the update


@dataclass
class _Slot:
    """A GPU staging buffer: rows master, exp_avg, exp_avg_sq (and the gradient sum) of one bucket."""

    buf: torch.Tensor
    owner: tuple[int, bool] | None = None  # (bucket index, states loaded) now in the slot
    loaded: Any = None  # CUDA event: the slot's host-to-device copies are done
    free: Any = None  # CUDA event: the last device-to-host copies out of the slot are done
