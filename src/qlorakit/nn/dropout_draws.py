"""The LoRA dropout masks of one fused autograd function: drawn in its forward, drawn again in its backward from
the random generator's state, never kept (a bool mask is half the size of a bf16 activation).

The draws are torch.native_dropout(x, p, train=True), as nn.Dropout makes them, so a fused function sees the masks
that the composed layers it replaces see from the same generator state. Two ways to replay them:
- eager (`DropoutDraw`): the generator's state before the function's first draw is read once; backward restores
  it inside torch.random.fork_rng and makes the same calls in the same order (what the functions did before they
  could be compiled; ~1 us more host time per function for choosing the way);
- traced (`TracedDraws`; torch.compile / export / make_fx: kernels.tracing()): dynamo cannot trace reading or
  setting the generator's state, so each draw is the op qlorakit::dropout_draw, which also returns the state before
  it; those states (uint8 CPU tensors, 16 bytes each for CUDA) are saved for backward, where qlorakit::dropout_replay
  draws each mask again (kernels/dropout_ops.py). Masks are the eager ones, bit for bit, for the same generator
  state.
A function chooses the way at its forward (`start`) and its backward follows that choice. Both kinds have the same
methods: forward calls `draw(x, key)` per mask, in order; it saves `saved_states(draws)` with save_for_backward and
keeps `for_ctx(draws)` on ctx; backward gets the draws back with `restore(kept, states)` and, inside
`with draws.replaying():`, calls `redraw(x)` -> (x_drop, mask) per mask in the forward's order (or `draw(x, key)`,
x_drop alone, to recompute a forward part); each `replaying()` starts from the first mask again. x: any shape and
float dtype; mask: bool of x's shape.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from .. import kernels


class DropoutDraw:
    """Eager draws with probability p on `device`: where its random generator stood before the first draw, so
    that backward draws the same masks again; replaying the same calls on tensors of the same shapes, in the same
    order, under `replaying()` gives bit-identical masks. The generator's own state is restored afterwards, so later
    draws are unaffected."""

    def __init__(self, device: torch.device, p: float):
        self.device, self.p = device, p
        self.state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()

    def draw(self, x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """x with dropout: the generator's next mask (key: unused here, see TracedDraws)."""
        return torch.native_dropout(x, self.p, True)[0]

    def redraw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x with dropout, bool mask) of the generator's next draw: the forward's, inside replaying()."""
        return torch.native_dropout(x, self.p, True)

    @contextmanager
    def replaying(self):
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(self.state, self.device)
            else:
                torch.set_rng_state(self.state)
            yield


class TracedDraws:
    """Draws with probability p while traced: each one a qlorakit::dropout_draw op, whose generator states
    (`states`) backward replays with qlorakit::dropout_replay. `states` given: the backward's replay."""

    def __init__(self, p: float, states: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None):
        self.p, self.replay, self.next = p, states is not None, 0
        self.states: list[torch.Tensor] = list(states) if states is not None else []

    def draw(self, x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """x with dropout: a fresh mask in forward, the forward's again in backward. key: the adapter's A weight
        (keeps draws of different adapters on one input apart in the graph, kernels/dropout_ops.py)."""
        if self.replay:
            return self.redraw(x)[0]
        x_drop, state = kernels.dropout_draw(x, self.p, key, self.states[-1] if self.states else None)
        self.states.append(state)
        return x_drop

    def redraw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x with dropout, bool mask) of the forward's next draw."""
        state = self.states[self.next]
        self.next += 1
        return kernels.dropout_replay(x, self.p, state)

    def replaying(self) -> AbstractContextManager:
        self.next = 0
        return nullcontext()


Draws = DropoutDraw | TracedDraws


def start(device: torch.device, p: float, training: bool) -> Draws | None:
    """The draws of a forward on `device`; None when none are drawn (eval, or p = 0)."""
    if not training or p <= 0:
        return None
    return TracedDraws(p) if kernels.tracing() else DropoutDraw(device, p)


def saved_states(draws: Draws | None) -> list[torch.Tensor]:
    """What the forward adds to save_for_backward: the traced draws' generator states, in draw order (nothing for
    eager draws or none)."""
    return draws.states if isinstance(draws, TracedDraws) else []


def for_ctx(draws: Draws | None) -> DropoutDraw | float | None:
    """What ctx keeps: the eager draws themselves, the probability of traced ones (their states are saved
    tensors), None for none."""
    return draws.p if isinstance(draws, TracedDraws) else draws


def restore(kept: DropoutDraw | float | None, states: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Draws | None:
    """The forward's draws for backward, from what ctx kept (for_ctx) and the saved states (saved_states)."""
    if kept is None or isinstance(kept, DropoutDraw):
        return kept
    return TracedDraws(kept, states)
