"""LoRA dropout draws as custom ops, for traced programs (torch.compile, torch.export, make_fx).

The fused LoRA functions (nn/lora_fused.py, nn/lora_blocks.py) keep no dropout mask: backward draws each mask
again from the random generator's state before the forward drew it (nn/dropout_draws.py). In eager execution they
read and set that state themselves. Dynamo cannot trace torch.get_rng_state / set_rng_state (each call is a graph
break, "Attempted to call function marked as skipped"), so while tracing the draw and its replay are these two
ops, which a tracer records as opaque calls:

  dropout_draw(x, p, key, after) -> (x_drop, state)
      x_drop = torch.native_dropout(x, p, train=True)[0], drawn from x's device's default generator exactly as
      eager code draws it; state: that generator's state just before the draw (uint8, on the CPU: 16 bytes for
      CUDA, philox seed + offset; 5056 for the CPU's Mersenne twister). Tagged nondeterministic_seeded.
  dropout_replay(x, p, state) -> (x_drop, mask)
      torch.native_dropout(x, p, train=True) drawn from `state` (x_drop like x, mask bool like x); the generator
      itself is left where it was. A pure function of its inputs.

`key` and `after` are not read: they keep draws apart in the graph. AOT autograd's common-subexpression pass
merges calls with equal arguments whatever their tags (torch/_functorch/compile_utils.fx_graph_cse checks a fixed
list of aten random ops), which would give two adapters that read one input the same mask; `key` is the adapter's
A weight, distinct per adapter. `after` is the state of the previous draw of the same function (None for its
first), so the draws stay in the order eager code makes them, and a compiled function draws the masks that eager
execution draws from the same generator state.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..errors import QlorakitError


def _check_device(device: torch.device) -> None:
    if device.type not in ("cpu", "cuda"):
        raise QlorakitError(f"LoRA dropout replay supports CPU and CUDA tensors, not {device.type}")


@functools.cache
def _state_numel(device_type: str) -> int:
    """Bytes of a default generator's state (the fake outputs' size; a meta tensor counts as the CPU's)."""
    return int((torch.cuda.get_rng_state() if device_type == "cuda" else torch.get_rng_state()).numel())


def _get_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@torch.library.custom_op("qlorakit::dropout_draw", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_draw(x: Tensor, p: float, key: Tensor, after: Tensor | None) -> tuple[Tensor, Tensor]:
    """(x_drop like x, the generator's state before the draw: uint8 [16] (CUDA) or [5056] (CPU), on the CPU)."""
    _check_device(x.device)
    state = _get_state(x.device)
    return torch.native_dropout(x, p, True)[0], state


@dropout_draw.register_fake
def _(x, p, key, after):
    return torch.empty_like(x), x.new_empty(_state_numel(x.device.type), dtype=torch.uint8, device="cpu")


@torch.library.custom_op("qlorakit::dropout_replay", mutates_args=())
def dropout_replay(x: Tensor, p: float, state: Tensor) -> tuple[Tensor, Tensor]:
    """(x_drop like x, mask bool like x) of torch.native_dropout(x, p, True) drawn from `state` (dropout_draw's)."""
    _check_device(x.device)
    cuda = x.device.type == "cuda"
    with torch.random.fork_rng(devices=[x.device] if cuda else []):
        if cuda:
            torch.cuda.set_rng_state(state, x.device)
        else:
            torch.set_rng_state(state)
        return torch.native_dropout(x, p, True)


@dropout_replay.register_fake
def _(x, p, state):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)
