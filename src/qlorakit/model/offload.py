"""Decoder-layer inputs kept in host memory between forward and backward (activation offloading).

A checkpointed decoder layer keeps only its input hidden states for backward ([B, T, hidden] in the compute
dtype) and recomputes the rest. With offloading, that input goes to a pinned host buffer instead: the copy runs
on a side stream while the next layers compute, and in backward the input of the next layer to come back is
copied to the GPU on that stream while the current layer recomputes (double buffering: at most the layer being
differentiated and the next one hold a reloaded input). The highest offloaded layer keeps its input on the GPU,
since its backward comes first and nothing could overlap its reload.

Arithmetic is the recompute path's: the same forward runs again in backward with the RNG and autocast state of
the first forward, so gradients are bit-identical to torch's checkpointing (tests/nn/test_offload.py on CPU,
benchmarks/offload_check.py on a GPU). The hook point is the per-layer `_gradient_checkpointing_func` that
transformers' GradientCheckpointingLayer calls with `(forward_fn, hidden_states, *rest)`.

The copies go through a `Mover`: `CudaMover` (pinned buffers reused across steps, one side stream, events), or
any object with the same three methods (tests use one that counts what moved).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("qlorakit.model")


class CudaMover:
    """Host copies of CUDA tensors on one side stream; pinned buffers reused across steps (one per layer)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.host: dict[int, torch.Tensor] = {}
        self.stored: dict[int, torch.cuda.Event] = {}

    def to_host(self, key: int, t: torch.Tensor) -> None:
        buf = self.host.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.host[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # the allocator keeps t's memory until the copy has read it
            done = torch.cuda.Event()
            done.record(self.stream)
        self.stored[key] = done

    def start_reload(self, key: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        buf = self.host[key]
        # Allocated from the compute stream's pool (a side-stream pool would hold its own reserve beside it); the
        # side stream first waits for the compute stream, so no earlier user of the block is still running.
        t = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.stored[key])
            t.copy_(buf, non_blocking=True)
            t.record_stream(self.stream)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return t, ready

    def finish_reload(self, pending: tuple[torch.Tensor, torch.cuda.Event]) -> torch.Tensor:
        t, ready = pending
        torch.cuda.current_stream(self.device).wait_event(ready)
        t.record_stream(torch.cuda.current_stream(self.device))
        return t

    def host_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.host.values())


@dataclass
class LayerInputOffload:
    """The offloading of the inputs of some decoder layers (`keys`: their indices in the decoder)."""

    mover: object
    keys: list[int]
    on_device: dict[int, torch.Tensor] = field(default_factory=dict)  # the highest layer's input, kept
    pending: dict[int, object] = field(default_factory=dict)  # reloads started, not yet waited for

    def store(self, key: int, hidden: torch.Tensor) -> None:
        if key == self.keys[0]:  # a new forward pass: nothing of an abandoned one (an exception) stays held
            self.on_device.clear()
            self.pending.clear()
        if key == self.keys[-1]:
            self.on_device[key] = hidden.detach()
        else:
            self.mover.to_host(key, hidden.detach())

    def load(self, key: int) -> torch.Tensor:
        """The input of layer `key`, on the device; starts the reload of the next offloaded layer below it."""
        if key in self.on_device:
            t = self.on_device.pop(key)
        else:
            if key not in self.pending:
                self.pending[key] = self.mover.start_reload(key)
            t = self.mover.finish_reload(self.pending.pop(key))
        below = [k for k in self.keys if k < key]
        if below and below[-1] not in self.pending:
            self.pending[below[-1]] = self.mover.start_reload(below[-1])
        return t


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _OffloadedLayer(torch.autograd.Function):
    """forward: run the layer without keeping anything but its input (moved out); backward: bring the input
    back, run the layer again with the first forward's RNG and autocast state, backpropagate through it."""

    @staticmethod
    def forward(ctx, offload: LayerInputOffload, key: int, run: Callable, hidden: torch.Tensor,
                _grad_anchor: torch.Tensor):
        ctx.offload, ctx.key, ctx.run = offload, key, run
        ctx.device, ctx.dtype, ctx.needs_input_grad_hidden = hidden.device, hidden.dtype, hidden.requires_grad
        ctx.rng = _rng_state(hidden.device)
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        with torch.no_grad():
            out = run(hidden)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"decoder layer {key} returned {type(out).__name__}; offloading needs layers that return "
                            "the hidden states tensor (transformers 5)")
        offload.store(key, hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.offload.load(ctx.key).detach().requires_grad_(ctx.needs_input_grad_hidden)
        cpu_rng, dev_rng = ctx.rng
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type if devices else "cuda"):
            torch.set_rng_state(cpu_rng)
            if dev_rng is not None:
                torch.cuda.set_rng_state(dev_rng, ctx.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden)
        torch.autograd.backward(out, grad_out)
        return None, None, None, hidden.grad if ctx.needs_input_grad_hidden else None, None


def _offloading_checkpoint(offload: LayerInputOffload, key: int):
    anchor = torch.empty(0, requires_grad=True)  # makes the output require grad when the input does not (layer 0)

    def checkpoint(run: Callable, hidden: torch.Tensor, *rest):
        if rest:
            raise TypeError("offloaded decoder layers take the hidden states as their only positional argument")
        if not torch.is_grad_enabled():  # no backward will come (a DPO reference pass, eval in train mode)
            return run(hidden)
        return _OffloadedLayer.apply(offload, key, run, hidden, anchor)

    return checkpoint


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return list(getattr(decoder, "layers", []))


def offload_layer_inputs(model: nn.Module, which: list[int], mover: object | None = None) -> LayerInputOffload | None:
    """Offload the inputs of the decoder layers `which` (indices; they must be checkpointed: their
    `gradient_checkpointing` is set) through `mover` (default: CudaMover on the layers' device). Layers not in
    `which` keep their checkpoint function. Returns the offload, or None when `which` is empty."""
    layers = decoder_layers(model)
    if not which:
        return None
    if mover is None:
        device = next(p.device for p in layers[which[0]].parameters())
        mover = CudaMover(device)
    offload = LayerInputOffload(mover, sorted(which))
    for key in offload.keys:
        layer = layers[key]
        if not hasattr(layer, "_gradient_checkpointing_func"):
            raise ValueError(f"decoder layer {key} is not set up for checkpointing; enable checkpointing first")
        if not hasattr(layer, "_qlorakit_recompute_func"):
            layer._qlorakit_recompute_func = layer._gradient_checkpointing_func
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = _offloading_checkpoint(offload, key)
    return offload


def stop_offloading(model: nn.Module) -> None:
    """Give every offloaded or hosted layer (offload_saved.py) its checkpointing as it was."""
    for layer in decoder_layers(model):
        if hasattr(layer, "_qlorakit_recompute_func"):
            layer._gradient_checkpointing_func = layer._qlorakit_recompute_func
            del layer._qlorakit_recompute_func
        if hasattr(layer, "_qlorakit_checkpointing"):  # a hosted layer (offload_saved.py) ran without checkpointing
            layer.gradient_checkpointing = layer._qlorakit_checkpointing
            del layer._qlorakit_checkpointing
