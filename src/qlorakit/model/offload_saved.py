"""Decoder layers whose saved activations wait for backward in pinned host memory (training.host_activations_gib).

A kept layer holds everything its backward needs on the GPU; a recomputed one holds only its input and runs its
forward again in backward. A hosted layer is a kept layer whose saved tensors leave the GPU: inside the layer's
forward, torch's saved-tensor hooks hand each tensor autograd saves to a `Mover`, which copies it to a pinned host
buffer on a side stream while the layers above compute. In backward the first tensor a hosted layer asks for
brings back all of that layer's tensors and starts bringing back the next hosted layer below (double buffering:
the layer being differentiated and the next one hold reloaded tensors). Nothing is recomputed, so the gradients
are the kept layer's, bit for bit; the cost is the host link: the layer's saved bytes cross it twice per step
(`benchmarks/host_link.py` measures what it sustains beside compute).

Not moved: parameters and buffers of the model (adapters, 4-bit weights), the inputs every layer shares (RoPE's
cos/sin, the mask), tensors under MIN_BYTES (norm statistics, dropout seeds) and views that do not cover their
memory densely (a copy would change their strides); they stay referenced as a kept layer holds them. Dense views (a
transpose) move with their strides. A tensor saved twice in one layer moves once; one read by several backward nodes
comes back once.

The hook point is the per-layer `_gradient_checkpointing_func` that transformers' GradientCheckpointingLayer
calls with `(forward_fn, hidden_states, *rest)` when the layer's `gradient_checkpointing` is set: a hosted layer
gets a function that runs the forward once, under the hooks, without checkpointing. The highest hosted layer is
still moved (its backward comes right after the layers above it, which are kept on the GPU when the plan keeps
any).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .offload import CudaMover, decoder_layers

log = logging.getLogger("qlorakit.model")

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the GPU (norm statistics, seeds: not worth a copy each)
# The hosted layers whose moved tensors stay referenced on the GPU while their copies may still read them: before
# a hosted layer's forward, the oldest are let go once this many are held (the compute stream waits for their
# copies; the CPU does not). After the last hosted layer all are let go, so none is held at the loss.
IN_FLIGHT_LAYERS = 2


@dataclass
class _Moved:
    """The handle autograd keeps for a moved tensor."""
    layer: int
    index: int


@dataclass
class SavedOffload:
    """The saved tensors of the hosted decoder layers `keys` (indices in the decoder), through `mover`."""

    mover: object
    keys: list[int]
    frozen: set[int]  # data pointers of the model's parameters and buffers: never moved
    shared: set[int] = field(default_factory=set)  # data pointers of the running layer's other inputs: not moved
    counts: dict[int, int] = field(default_factory=dict)  # tensors moved per layer in the last forward
    current: dict[int, tuple[torch.Tensor, _Moved]] = field(default_factory=dict)  # id -> (tensor, handle), one layer
    inflight: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layers whose copies may still read them
    pending: dict[tuple[int, int], object] = field(default_factory=dict)  # reloads started, not yet taken
    begun: set[int] = field(default_factory=set)  # layers whose backward has asked for a tensor
    loaded: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # reloaded, by layer and index
    stayed: int = 0  # tensors of the last forward that stayed on the device (small, frozen or strided)
    moved_bytes: int = 0  # bytes moved to the host in the last forward

    def begin(self, key: int) -> None:
        if key == self.keys[0]:  # a new forward pass: nothing of an abandoned one stays held
            self.release()
            self.stayed = self.moved_bytes = 0
        self.counts[key] = 0
        self.current.clear()
        while self.inflight and len(self.inflight) >= IN_FLIGHT_LAYERS:  # the oldest layer's copies: done first
            self._let_go(min(self.inflight))

    def _let_go(self, key: int) -> None:
        """Drop the device tensors of layer `key`, the compute stream first waiting for their copies (so the
        memory is reused only after they are read)."""
        if self.counts.get(key):
            self.mover.wait_stored((key, self.counts[key] - 1))  # copies run in order: the last one's event
        del self.inflight[key]

    def end(self, key: int) -> None:
        self.inflight[key] = [t for t, _ in self.current.values()]
        self.current.clear()
        if key == self.keys[-1]:  # the last hosted layer: the loss, where a short step peaks, runs without them
            for k in sorted(self.inflight):
                self._let_go(k)

    def pack(self, key: int, t: torch.Tensor):
        if (isinstance(t, nn.Parameter) or t.numel() * t.element_size() < MIN_BYTES or not _dense(t)
                or t.untyped_storage().data_ptr() in self.frozen or t.untyped_storage().data_ptr() in self.shared):
            self.stayed += 1
            return t
        seen = self.current.get(id(t))
        if seen is not None and seen[0] is t:
            return seen[1]
        handle = _Moved(key, self.counts[key])
        self.counts[key] += 1
        self.current[id(t)] = (t, handle)
        self.mover.to_host((key, handle.index), t.detach())
        self.moved_bytes += t.numel() * t.element_size()
        return handle

    def _start_layer(self, key: int) -> None:
        for i in range(self.counts.get(key, 0)):
            if (key, i) not in self.pending:
                self.pending[(key, i)] = self.mover.start_reload((key, i))

    def unpack(self, handle):
        if not isinstance(handle, _Moved):
            return handle
        key = handle.layer
        if key not in self.begun:  # the layer's first tensor in this backward: it and the next one below come back
            if not self.begun:
                _at_backward_end(self.release)
                for k in sorted(self.inflight):
                    self._let_go(k)
            self.begun.add(key)
            for k in [k for k in self.loaded if k > key]:  # the layers above are done
                del self.loaded[k]
            self._start_layer(key)
            below = [k for k in self.keys if k < key]
            if below:
                self._start_layer(below[-1])
        loaded = self.loaded.setdefault(key, {})
        t = loaded.get(handle.index)
        if t is None:  # a tensor saved by several nodes comes back once
            pending = self.pending.pop((key, handle.index), None)
            if pending is None:  # asked for again after its layer was released: bring it back again
                pending = self.mover.start_reload((key, handle.index))
            t = loaded[handle.index] = self.mover.finish_reload(pending)
        return t

    def release(self) -> None:
        """Drop every reloaded tensor, reload in flight and tensor still held for its copy (the end of a backward
        pass, or a forward pass without one); the compute stream waits for the copies first."""
        for k in sorted(self.inflight):
            self._let_go(k)
        for pending in self.pending.values():
            self.mover.finish_reload(pending)
        self.loaded.clear()
        self.pending.clear()
        self.begun.clear()


def _at_backward_end(fn: Callable) -> None:
    """Run `fn` when the backward pass now running ends (directly where no engine is running)."""
    try:
        torch.autograd.Variable._execution_engine.queue_callback(fn)
    except RuntimeError:  # not inside backward (a saved tensor read by hand)
        pass


class SavedCudaMover(CudaMover):
    """CudaMover for many tensors per layer, strides kept (a transposed view comes back transposed, so backward
    runs the same kernels on it), and without record_stream: the offload holds each tensor until the compute
    stream has waited for its copy (wait_stored), and a reloaded tensor belongs to the compute stream, which waits
    for its copy before using it, so freed memory is reused at once, in stream order, and the CPU never blocks."""

    def to_host(self, key, t: torch.Tensor) -> None:
        buf = self.host.get(key)
        if buf is None or buf.shape != t.shape or buf.stride() != t.stride() or buf.dtype != t.dtype:
            buf = self.host[key] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.stored[key] = done

    def wait_stored(self, key) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.stored[key])

    def start_reload(self, key):
        buf = self.host[key]
        t = torch.empty_strided(buf.shape, buf.stride(), dtype=buf.dtype, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.stored[key])
            t.copy_(buf, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return t, ready

    def finish_reload(self, pending) -> torch.Tensor:
        t, ready = pending
        torch.cuda.current_stream(self.device).wait_event(ready)
        return t


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its memory exactly once in some dimension order (a copy keeps its strides)."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=lambda i: t.stride(i), reverse=True)
    return t.permute(order).is_contiguous()


def _shared_storages(run: Callable, rest: tuple) -> set[int]:
    """Data pointers of the tensors every layer is given besides its hidden states (RoPE's cos/sin, the mask,
    the positions): they live on beside the layer, so moving a layer's saved copy of them frees nothing."""
    found: list = [*rest, *getattr(run, "keywords", {}).values()]
    ptrs = set()
    while found:
        item = found.pop()
        if isinstance(item, torch.Tensor):
            ptrs.add(item.untyped_storage().data_ptr())
        elif isinstance(item, (tuple, list)):
            found.extend(item)
    return ptrs


def _hosted_forward(offload: SavedOffload, key: int) -> Callable:
    def run_hosted(run: Callable, hidden: torch.Tensor, *rest):
        if not torch.is_grad_enabled():  # nothing is saved without a backward to come
            return run(hidden, *rest)
        offload.shared = _shared_storages(run, rest)
        offload.begin(key)
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: offload.pack(key, t), offload.unpack):
                return run(hidden, *rest)
        finally:
            offload.end(key)

    return run_hosted


def host_saved_activations(model: nn.Module, which: list[int], mover: object | None = None) -> SavedOffload | None:
    """Move the saved activations of the decoder layers `which` (indices) to host memory through `mover` (default:
    SavedCudaMover on the layers' device). The layers run once, without checkpointing. Returns the offload, or
    None when `which` is empty. model/offload.stop_offloading gives the layers their functions back."""
    layers = decoder_layers(model)
    if not which:
        return None
    if mover is None:
        device = next(p.device for p in layers[which[0]].parameters())
        mover = SavedCudaMover(device)
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    offload = SavedOffload(mover, sorted(which), frozen)
    for key in offload.keys:
        layer = layers[key]
        if not hasattr(layer, "gradient_checkpointing"):
            raise ValueError(f"decoder layer {key} has no checkpointing hook (not a transformers "
                             "GradientCheckpointingLayer); its saved activations cannot be moved")
        if not hasattr(layer, "_qlorakit_recompute_func"):
            layer._qlorakit_recompute_func = getattr(layer, "_gradient_checkpointing_func", None)
            layer._qlorakit_checkpointing = layer.gradient_checkpointing
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = _hosted_forward(offload, key)
    return offload
