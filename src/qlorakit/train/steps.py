"""The stream of micro-batches a run walks through (epoch by epoch, in the order epoch_batches plans them), and
how many optimizer steps a run plans."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import QlorakitError

if TYPE_CHECKING:
    from .loop import LoopSettings


class Cursor:
    """Position in the stream of micro-batches: (epoch, index into that epoch's batch plan)."""

    def __init__(self, plan_fn, epoch: int = 0, index: int = 0):
        self.plan_fn, self.epoch, self.index = plan_fn, epoch, index
        self.plan = plan_fn(epoch)

    def next(self) -> list[list[int]]:
        while self.index >= len(self.plan):
            self.epoch, self.index = self.epoch + 1, 0
            self.plan = self.plan_fn(self.epoch)
        batch = self.plan[self.index]
        self.index += 1
        return batch


def planned_steps(train_examples, settings: LoopSettings) -> int:
    """The run's optimizer steps: max_steps, or epochs over the batch plan at gradient_accumulation."""
    from ..data import epoch_batches

    batches = len(epoch_batches(train_examples.lengths, settings.batch_size, settings.max_seq_length,
                                settings.packing, seed=settings.seed, epoch=0))
    if batches == 0:
        raise QlorakitError("no training batches: the training set is empty after filtering")
    return settings.max_steps or max(1, math.ceil(settings.epochs * batches / settings.gradient_accumulation))
