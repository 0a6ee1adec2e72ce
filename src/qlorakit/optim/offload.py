"""Offloaded optimizer states: pinned host memory, streamed through the GPU around each update.

The states of a group of parameters lie in one pinned host buffer, cut into chunks of whole slots (about
`CHUNK_BYTES` each). Every step, chunk k is copied to GPU staging buffer k % 2 on a host-to-device stream,
updated by the same kernel on the current stream, and copied back on a device-to-host stream, so the copy in of
the next chunk and the copy out of the previous one overlap the update of this one. The GPU holds only the two
staging buffers (torch memory); the states themselves never count against the card. The price is two PCIe
transfers of all the state bytes per step, evicted or not; paged states pay a migration only after the driver
has evicted them.
"""

from __future__ import annotations

import torch

from .storage import Apply, Slot, Work, items_for, kernel_views, reset_states

CHUNK_BYTES = 64 * 2**20


def plan_chunks(slots: list[Slot], chunk_bytes: int = CHUNK_BYTES) -> tuple[list[tuple[int, int]], list[int]]:
    """Chunks of whole consecutive slots, (byte start, byte end) each, and each slot's chunk index; a slot larger
    than chunk_bytes is one chunk. The GPU holds two staging buffers of the largest chunk's size."""
    chunks: list[tuple[int, int]] = []
    chunk_of: list[int] = []
    for s in slots:
        if chunks and s.offset + s.nbytes - chunks[-1][0] <= chunk_bytes:
            chunks[-1] = (chunks[-1][0], s.offset + s.nbytes)
        else:
            chunks.append((s.offset, s.offset + s.nbytes))
        chunk_of.append(len(chunks) - 1)
    return chunks, chunk_of


class OffloadArena:
    """States of several parameters of one CUDA device in pinned host memory (placement 'pinned')."""

    placement = "pinned"

    def __init__(self, device: torch.device, slots: list[Slot], chunk_bytes: int = CHUNK_BYTES):
        self.device, self.slots = device, slots
        self.nbytes = max(1, sum(s.nbytes for s in slots))
        self.buffer = torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=True)
        self.views = [s.views(self.buffer, s.offset) for s in slots]
        for s, v in zip(slots, self.views):
            reset_states(s, v)
        self.chunks, self.chunk_of = plan_chunks(slots, chunk_bytes)
        largest = max((end - start for start, end in self.chunks), default=1)
        self.staging = [torch.empty(largest, dtype=torch.uint8, device=device) for _ in range(2)]
        staging_views = [
            s.views(self.staging[self.chunk_of[i] % 2], s.offset - self.chunks[self.chunk_of[i]][0])
            for i, s in enumerate(slots)
        ]
        self.staging_states, self.staging_pointers = kernel_views(slots, staging_views)
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)

    def state_bytes(self) -> int:
        return sum(s.state_bytes() for s in self.slots)

    def staging_bytes(self) -> int:
        return sum(b.numel() for b in self.staging)

    def update(self, work: list[Work], apply: Apply) -> None:
        by_chunk: dict[int, list[Work]] = {}
        for w in work:
            by_chunk.setdefault(self.chunk_of[w.slot], []).append(w)
        compute = torch.cuda.current_stream(self.device)
        self.h2d.wait_stream(compute)  # gradients are ready; the last step's copies out are done
        buffer_free: list[torch.cuda.Event | None] = [None, None]
        for ci in sorted(by_chunk):
            start, end = self.chunks[ci]
            buf = self.staging[ci % 2]
            with torch.cuda.stream(self.h2d):
                if buffer_free[ci % 2] is not None:
                    self.h2d.wait_event(buffer_free[ci % 2])
                buf[: end - start].copy_(self.buffer[start:end], non_blocking=True)
            compute.wait_event(self.h2d.record_event())
            apply(items_for(by_chunk[ci], self.slots, self.staging_states, self.staging_pointers))
            self.d2h.wait_event(compute.record_event())
            with torch.cuda.stream(self.d2h):
                self.buffer[start:end].copy_(buf[: end - start], non_blocking=True)
            buffer_free[ci % 2] = self.d2h.record_event()
        compute.wait_stream(self.d2h)

    def synchronize(self) -> None:
        """Wait until the host copy is current (before the CPU reads or writes it)."""
        torch.cuda.synchronize(self.device)
