"""Paged optimizer states: buffers in CUDA unified memory (cudaMallocManaged).

A managed buffer is an ordinary CUDA tensor to torch and to the kernels, but its pages belong to the driver,
not to torch's caching allocator: torch.cuda.memory_allocated() and set_per_process_memory_fraction() do not
see it, and when the card runs short the driver may move its pages to host memory and back on access. Before an
update the optimizer prefetches its buffer to the GPU (cudaMemPrefetchAsync on the current stream) when
PrefetchPolicy says so (by default: while evictions are seen), so an evicted buffer comes back in one bulk
migration instead of page faults. Nothing here evicts on purpose.

Safety on a shared card: asking the driver for more managed memory than the card has free can hang the GPU.
So every allocation first reads cudaMemGetInfo and refuses (PagedMemoryError, nothing allocated) unless the
request plus a margin fits in the free memory at that moment; the new buffer is then made resident and zeroed
at once, so that the next check already counts it.
"""

from __future__ import annotations

import logging
import threading

import torch

from .cudart import DEV_ATTR_CONCURRENT_MANAGED_ACCESS, DEV_ATTR_MANAGED_MEMORY, cuda_runtime
from .dlpack import tensor_from_pointer
from .errors import PagedMemoryError

log = logging.getLogger("qlorakit.optim")

FREE_MEMORY_MARGIN = 512 * 2**20  # bytes left free beyond every managed request (context, kernels, others)

_live = {"bytes": 0, "buffers": 0}
_lock = threading.Lock()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_managed_support(device: torch.device) -> None:
    """PagedMemoryError unless `device` supports managed memory that the GPU and CPU may use concurrently
    (what prefetching and driver eviction need)."""
    if device.type != "cuda":
        raise PagedMemoryError(f"paged optimizer states need a CUDA device, got {device}")
    rt = cuda_runtime()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if not rt.device_attribute(DEV_ATTR_MANAGED_MEMORY, idx):
        raise PagedMemoryError(f"cuda:{idx} does not support managed memory (cudaDevAttrManagedMemory = 0); "
                               "use adamw_32bit or adamw_8bit (states in ordinary GPU memory)")
    if not rt.device_attribute(DEV_ATTR_CONCURRENT_MANAGED_ACCESS, idx):
        raise PagedMemoryError(f"cuda:{idx} cannot page managed memory on demand (cudaDevAttrConcurrentManagedAccess "
                               "= 0, e.g. some virtualised GPUs), so paged states could neither be prefetched nor "
                               "evicted; use adamw_32bit or adamw_8bit (states in ordinary GPU memory)")


def allocate_managed(nbytes: int, device: torch.device) -> torch.Tensor:
    """A zeroed uint8 CUDA tensor [nbytes] in unified memory, resident on `device`; freed (cudaFree) when the
    last tensor over it is gone. PagedMemoryError, with nothing allocated, if the card lacks the free memory."""
    device = torch.device(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", idx)
    check_managed_support(device)
    rt = cuda_runtime()
    nbytes = max(1, int(nbytes))
    with torch.cuda.device(idx):
        rt.set_device(idx)
        free, total = torch.cuda.mem_get_info(idx)
        if nbytes + FREE_MEMORY_MARGIN > free and torch.cuda.memory_reserved(idx) > torch.cuda.memory_allocated(idx):
            # torch's cached but unused blocks count as used to the driver; hand them back once and look again.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(idx)
        if nbytes + FREE_MEMORY_MARGIN > free:
            raise PagedMemoryError(
                f"paged optimizer states need {_gib(nbytes)} of unified memory on cuda:{idx}, but only {_gib(free)} "
                f"of its {_gib(total)} are free (and {_gib(FREE_MEMORY_MARGIN)} is kept spare). Asking the driver "
                "for more managed memory than the card has free can hang the GPU, so nothing was allocated. Use "
                "8-bit states (paged_adamw_8bit needs about 4x less), free GPU memory before the first step, or "
                "keep the states in ordinary GPU memory (adamw_32bit / adamw_8bit)."
            )
        ptr = rt.malloc_managed(nbytes)

        def release() -> None:
            rt.free(ptr)
            with _lock:
                _live["bytes"] -= nbytes
                _live["buffers"] -= 1

        with _lock:
            _live["bytes"] += nbytes
            _live["buffers"] += 1
        buf = tensor_from_pointer(ptr, nbytes, device, release)
        stream = torch.cuda.current_stream(idx)
        rt.prefetch(ptr, nbytes, idx, stream.cuda_stream)
        buf.zero_()
        stream.synchronize()  # resident now, so the next free-memory reading counts it
    log.debug("qlorakit: %s of managed memory on cuda:%d for optimizer states", _gib(nbytes), idx)
    return buf


def prefetch(buf: torch.Tensor, to_host: bool = False) -> None:
    """Queue the migration of a managed buffer to its GPU (or to host memory) on the current stream."""
    idx = buf.device.index
    cuda_runtime().prefetch(buf.data_ptr(), buf.numel() * buf.element_size(), None if to_host else idx,
                            torch.cuda.current_stream(idx).cuda_stream)


PREFETCH_MODES = ("auto", "always", "never")


class PrefetchPolicy:
    """When to prefetch a managed buffer before an update.

    cudaMemPrefetchAsync walks its whole range in the driver even when every page is already on the GPU: on an
    H200 about 0.8 ms of host time per GiB per call, which is +30% on a 32-bit AdamW step of the 8B shape's
    adapters. Pages leave the GPU only when the driver evicts them under memory pressure, so:
      always  prefetch before every update;
      never   never (an evicted page comes back by a GPU page fault when the update touches it: ~4x slower);
      auto    (default) prefetch while evictions are being seen, not while nothing is evicted. Each update is
              timed with CUDA events, read back at the next update (no waiting). Without a prefetch, an update
              that takes more than SLOW_FACTOR times the fastest one seen (+ SLOW_MARGIN_MS) ran on evicted
              pages (page faults): prefetching starts. With a prefetch, the time from before the prefetch to the
              update's start is what the migration took; after QUIET_UPDATES updates in a row with nothing
              moved, prefetching stops again. So a run without memory pressure pays two event records per
              update, and a run under pressure pays one slow update and then bulk migrations.
    `stats` counts prefetches, updates timed, and evictions seen.
    """

    SLOW_FACTOR = 2.0
    SLOW_MARGIN_MS = 0.5
    MOVED_MS = 0.2
    QUIET_UPDATES = 20

    def __init__(self, mode: str = "auto", *, prefetch_fn=None, event_fn=None):
        if mode not in PREFETCH_MODES:
            raise PagedMemoryError(f"prefetch mode {mode!r} is not allowed; use one of {PREFETCH_MODES}")
        self.mode = mode
        self.prefetching = mode == "always"
        self.fastest_ms: float | None = None
        self.quiet = 0
        self._pending = None  # events of the last update: (before prefetch or None, start, end)
        self._prefetch = prefetch_fn
        self._event = event_fn or (lambda: torch.cuda.Event(enable_timing=True))
        self.stats = {"prefetches": 0, "updates_timed": 0, "evictions_seen": 0}

    def set_mode(self, mode: str) -> None:
        if mode not in PREFETCH_MODES:
            raise PagedMemoryError(f"prefetch mode {mode!r} is not allowed; use one of {PREFETCH_MODES}")
        self.mode = mode
        self.prefetching = mode == "always"
        self.quiet = 0
        self._pending = None  # an update timed under the previous mode decides nothing under this one

    def _review(self) -> None:
        """Read the last update's timings, if its events have completed, and adjust `prefetching`."""
        if self._pending is None:
            return
        before, start, end = self._pending
        if not end.query():
            return
        self._pending = None
        self.stats["updates_timed"] += 1
        update_ms = start.elapsed_time(end)
        moved = False
        if before is not None:
            moved = before.elapsed_time(start) > self.MOVED_MS
            self.quiet = 0 if moved else self.quiet + 1
            if moved:
                self.stats["evictions_seen"] += 1
            if self.mode == "auto" and self.quiet >= self.QUIET_UPDATES:
                self.prefetching = False
        elif self.fastest_ms is not None and update_ms > self.SLOW_FACTOR * self.fastest_ms + self.SLOW_MARGIN_MS:
            self.stats["evictions_seen"] += 1
            if self.mode == "auto":
                self.prefetching, self.quiet = True, 0
            return  # a faulting update says nothing about the resident speed
        if not moved:
            self.fastest_ms = update_ms if self.fastest_ms is None else min(self.fastest_ms, update_ms)

    def before_update(self) -> None:
        """Call on the update's stream right before the update: prefetches if the policy says so."""
        self._review()
        before = None
        if self.prefetching:
            before = self._event()
            before.record()
            self._prefetch()
            self.stats["prefetches"] += 1
        start = self._event()
        start.record()
        self._pending = (before, start, None)

    def after_update(self) -> None:
        """Call on the same stream right after the update."""
        if self._pending is None or self._pending[2] is not None:
            return
        end = self._event()
        end.record()
        self._pending = (self._pending[0], self._pending[1], end)


def memory_kind(t: torch.Tensor) -> str:
    """Where CUDA says t's memory is: 'managed', 'device', 'host' (pinned) or 'unregistered' (pageable)."""
    return cuda_runtime().pointer_kind(t.data_ptr())


def managed_bytes_live() -> int:
    """Bytes of managed memory this process holds for optimizer states now."""
    return _live["bytes"]
