"""Where optimizer states live: one byte buffer (an arena) per device and placement, cut into per-parameter slots.

A slot holds one parameter's moments: 32-bit, exp_avg and exp_avg_sq fp32 [n]; 8-bit, exp_avg_codes and
exp_avg_sq_codes uint8 [n] then exp_avg_absmax and exp_avg_sq_absmax fp32 [ceil(n / block_size)]. Each part starts
on a 256-byte boundary. One arena per placement means one allocation, one prefetch per step for paged states and
one contiguous range per chunk for offloaded ones.

Placements:
  device   ordinary GPU memory from torch's caching allocator (torch counts it);
  managed  CUDA unified memory (`paged`), prefetched to the GPU before an update when pages were evicted
           (paged.PrefetchPolicy: auto, always or never);
  pinned   pinned host memory, streamed through two GPU staging buffers every step (`offload`);
  cpu      ordinary host memory, for parameters on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .paged import PrefetchPolicy, allocate_managed, prefetch
from .reference import StepConstants, UpdateItem, state_pointers
from .state_8bit import num_blocks, state_maps

ALIGN = 256
KEYS_32BIT = ("exp_avg", "exp_avg_sq")
KEYS_8BIT = ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax")
PLACEMENTS = ("device", "managed", "pinned", "cpu")
PLACEMENT_WORDS = {
    "device": "ordinary GPU memory (torch's allocator)",
    "managed": "CUDA unified memory (paged: evictable by the driver, prefetched back before updates while it evicts)",
    "pinned": "pinned host memory (offloaded: copied to the GPU and back around each update)",
    "cpu": "CPU memory",
}


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Slot:
    """One parameter's states inside an arena: `parts` are (key, dtype, count, byte offset from `offset`)."""

    numel: int
    quantized: bool
    block_size: int
    offset: int
    nbytes: int
    parts: tuple[tuple[str, torch.dtype, int, int], ...]

    @classmethod
    def make(cls, numel: int, quantized: bool, block_size: int, offset: int) -> Slot:
        if quantized:
            nb = num_blocks(numel, block_size)
            spec = [(KEYS_8BIT[0], torch.uint8, numel), (KEYS_8BIT[1], torch.uint8, numel),
                    (KEYS_8BIT[2], torch.float32, nb), (KEYS_8BIT[3], torch.float32, nb)]
        else:
            spec = [(KEYS_32BIT[0], torch.float32, numel), (KEYS_32BIT[1], torch.float32, numel)]
        parts, pos = [], 0
        for key, dtype, count in spec:
            parts.append((key, dtype, count, pos))
            pos += _align(count * dtype.itemsize)
        return cls(numel, quantized, block_size, offset, pos, tuple(parts))

    def views(self, buf: torch.Tensor, base: int) -> dict[str, torch.Tensor]:
        """The slot's tensors over `buf` (uint8), the slot starting at byte `base` of it."""
        out = {}
        for key, dtype, count, rel in self.parts:
            start = base + rel
            out[key] = buf[start:start + count * dtype.itemsize].view(dtype)
        return out

    def state_bytes(self) -> int:
        """Bytes of state proper (without alignment padding)."""
        return sum(count * dtype.itemsize for _, dtype, count, _ in self.parts)

    def kernel_states(self, views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(views[k] for k in (KEYS_8BIT if self.quantized else KEYS_32BIT))


def reset_states(slot: Slot, views: dict[str, torch.Tensor]) -> None:
    """Zero moments: fp32 zeros, or codes of 0.0 with absmax 0."""
    for t in views.values():
        t.zero_()
    if slot.quantized:
        views[KEYS_8BIT[0]].fill_(state_maps(views[KEYS_8BIT[0]].device).signed_zero)


@dataclass
class Work:
    """One parameter to update this step: its slot index in the arena, tensors and step constants."""

    slot: int
    param: torch.Tensor
    grad: torch.Tensor
    constants: StepConstants


def items_for(work: list[Work], slots: list[Slot], states: list[tuple[torch.Tensor, ...]],
              pointers: list[tuple[int, ...]]) -> list[UpdateItem]:
    """The kernel's view of `work`, given each slot's state tensors and their data pointers."""
    return [UpdateItem(w.param, w.grad, states[w.slot], w.constants, slots[w.slot].quantized, slots[w.slot].block_size,
                       pointers[w.slot]) for w in work]


def kernel_views(slots: list[Slot], views: list[dict[str, torch.Tensor]]) -> tuple[list, list]:
    """Per slot, the state tensors in kernel order and their data pointers (computed once)."""
    states = [s.kernel_states(v) for s, v in zip(slots, views)]
    return states, [state_pointers(st, s.quantized) for s, st in zip(slots, states)]


Apply = Callable[[list[UpdateItem]], None]


class Arena:
    """States of several parameters of one device in one buffer (placements device, managed, cpu)."""

    def __init__(self, placement: str, device: torch.device, slots: list[Slot], prefetch_mode: str = "auto"):
        self.placement, self.device, self.slots = placement, device, slots
        self.nbytes = max(1, sum(s.nbytes for s in slots))
        if placement == "managed":
            self.buffer = allocate_managed(self.nbytes, device)
        elif placement in ("device", "cpu"):
            self.buffer = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        else:
            raise ValueError(f"Arena placement {placement!r}; use OffloadArena for pinned states")
        self.views = [s.views(self.buffer, s.offset) for s in slots]
        for s, v in zip(slots, self.views):
            reset_states(s, v)
        self.kernel_states, self.pointers = kernel_views(slots, self.views)
        self.prefetch = (PrefetchPolicy(prefetch_mode, prefetch_fn=lambda: prefetch(self.buffer))
                         if placement == "managed" else None)

    def state_bytes(self) -> int:
        return sum(s.state_bytes() for s in self.slots)

    def update(self, work: list[Work], apply: Apply) -> None:
        if self.prefetch is not None:
            self.prefetch.before_update()
        apply(items_for(work, self.slots, self.kernel_states, self.pointers))
        if self.prefetch is not None:
            self.prefetch.after_update()

    def synchronize(self) -> None:
        """Nothing to wait for: reads of device/managed views are ordered on the current stream."""
