"""The LoRA dropout masks of one fused autograd function: drawn in its forward, drawn again in its backward from
the random generator's state, never kept (a bool mask is half the size of a bf16 activation).

The draws are torch.native_dropout(x, p, train=True), as nn.Dropout makes them, so a fused function sees the masks
that the composed layers it replaces see from the same generator state. Two ways to replay them:
- eager (`DropoutDraw`): the generator's state before the function's first draw is read once; backward restores
  it inside torch.random.fork_rng and makes the same calls in the same order;
- traced (torch.compile / export / make_fx: kernels.tracing()): dynamo cannot trace reading or setting the
  generator's state, so each draw is the op qlorakit::dropout_draw, which also returns the state before it; those
  states (uint8 CPU tensors, 16 bytes each for CUDA) are saved for backward, where qlorakit::dropout_replay draws
  each mask again (kernels/dropout_ops.py). Masks are the eager ones, bit for bit, for the same generator state.
A function chooses the way at its forward (`Draws.start`) and its backward follows that choice.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from .. import kernels


class DropoutDraw:
    """Where the random generator of `device` stood before a run of dropout draws (eager execution), so that
    backward draws the same masks again: replaying the same calls on tensors of the same shapes, in the same order,
    under `replay()` gives bit-identical masks. The generator's own state is restored afterwards, so later draws
    are unaffected."""

    def __init__(self, device: torch.device):
        self.device = device
        self.state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()

    @contextmanager
    def replay(self):
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(self.state, self.device)
            else:
                torch.set_rng_state(self.state)
            yield


class Draws:
    """The dropout draws (probability p) of one autograd function call.

    Forward: `Draws.start(...)`, then `draw(x, key)` per mask, in order; save `Draws.saved(draws)` with
    save_for_backward and keep `Draws.info(draws)` on ctx. Backward: `Draws.restore(p, info, saved states)`, then
    inside `with draws.replaying():` `redraw(x)` -> (x_drop, mask) per mask in the forward's order (or
    `draw(x, key)`, which gives x_drop alone, to recompute a forward part); a new `replaying()` starts from the
    first mask again. x: any shape, any float dtype; mask: bool of x's shape."""

    def __init__(self, p: float, eager: DropoutDraw | None, states: list[torch.Tensor], replay: bool):
        self.p, self.eager, self._states, self._replay, self._next = p, eager, states, replay, 0

    @staticmethod
    def start(device: torch.device, p: float, training: bool) -> Draws | None:
        """The draws of a forward on `device`; None when no dropout is drawn (eval, or p = 0)."""
        if not training or p <= 0:
            return None
        if kernels.tracing():
            return Draws(p, None, [], replay=False)
        return Draws(p, DropoutDraw(device), [], replay=False)

    @staticmethod
    def saved(draws: Draws | None) -> list[torch.Tensor]:
        """The tensors for save_for_backward: the traced draws' generator states, in draw order (none for eager
        draws or none drawn)."""
        return [] if draws is None else draws._states

    @staticmethod
    def info(draws: Draws | None) -> tuple[bool, DropoutDraw | None]:
        """What ctx keeps besides the saved states: whether anything was drawn, and the eager draws' start."""
        return (False, None) if draws is None else (True, draws.eager)

    @staticmethod
    def restore(p: float, info: tuple[bool, DropoutDraw | None],
                states: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Draws | None:
        """The forward's draws (`info` and `saved` of them), to replay in backward; None when it drew none."""
        drawn, eager = info
        return Draws(p, eager, list(states), replay=True) if drawn else None

    def draw(self, x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """x with dropout: the next mask, freshly drawn in forward, the forward's again in backward. key: the
        adapter's A weight (keeps traced draws of different adapters apart, kernels/dropout_ops.py)."""
        if self.eager is not None:
            return torch.native_dropout(x, self.p, True)[0]
        if self._replay:
            return self.redraw(x)[0]
        after = self._states[-1] if self._states else None
        x_drop, state = kernels.dropout_draw(x, self.p, key, after)
        self._states.append(state)
        return x_drop

    def redraw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x with dropout, bool mask) of the forward's next draw, in backward inside replaying()."""
        if self.eager is not None:
            return torch.native_dropout(x, self.p, True)
        state = self._states[self._next]
        self._next += 1
        return kernels.dropout_replay(x, self.p, state)

    def replaying(self) -> AbstractContextManager:
        """Backward's draws start again from the forward's first mask inside this context."""
        if self.eager is not None:
            return self.eager.replay()
        self._next = 0
        return nullcontext()
