"""Continuous batching for `qlorakit serve`: requests join the running batch at the next decoding step.

The decoding thread (serve.AdapterServer) owns one Batcher. It holds up to max_batch requests, one per row slot
of a slots.SlotDecoder. Each turn of the thread: the requests that arrived meanwhile (as many as there are free
slots) are prefilled together into free slots and take their first token from the prefill; then every occupied
slot takes one shared decoding step and its next token. A request leaves its slot at its end-of-sequence token,
at its max_tokens, or as soon as its client has gone away (it takes no further step), and the slot is free for
the next request at once. No row is ever prefilled twice: `stats["rows"]` counts rows prefilled, one per
request, and `stats["steps"]` the shared steps.

Sampling is per row: greedy rows take the argmax, sampled ones draw with their own temperature and nucleus top_p
from a generator of their own seeded 0 (as `qlorakit generate` seeds it), so requests of any sampling settings
share the batch and a reply does not depend on what it is batched with (beyond the matmuls' rounding).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .decode import choose_next

MIN_WIDTH = 256  # cache columns per slot, at least; a wider cache is made when a request needs it
SEED = 0  # of every sampled row's generator, as `qlorakit generate` seeds its own


@dataclass(eq=False)  # a job is itself, not its fields: two equal requests hold two slots
class _Job:
    """One request for the decoding thread."""

    model: str
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[str, int, int] | None = None
    error: BaseException | None = None
    stream: Any = None  # streaming: something with put(), given each new token id as it is made, then None
    on_done: Callable[[], None] | None = None  # called by the decoding thread once done is set
    cancelled: threading.Event = field(default_factory=threading.Event)  # its client went away
    generated: list[int] = field(default_factory=list)  # the reply's token ids so far
    finished: bool = False
    generator: torch.Generator | None = None  # a sampled request's own, while it holds a slot

    @property
    def need(self) -> int:
        """Cache columns this request fills at most: its prompt and all its new tokens but the last."""
        return len(self.ids) + self.max_tokens


class Batcher:
    """The requests in progress, one per slot of a SlotDecoder, and what moves them on.

    `select(models)` points the LoRA bank's rows at those adapters (row i takes models[i]); `stats` is updated in
    place."""

    def __init__(self, net: nn.Module, tokenizer, eos: list[int], select: Callable[[list[str]], None],
                 max_batch: int, context: int | None, stats: dict[str, int]):
        self.net, self.tokenizer, self.eos, self.select = net, tokenizer, set(eos), select
        self.context, self.stats = context, stats
        self.slots: list[_Job | None] = [None] * max_batch
        self.decoder = None  # a slots.SlotDecoder while any slot is occupied
        self.device = next(net.parameters()).device
        self.next_ids = torch.zeros(max_batch, dtype=torch.long)  # each slot's token for the next step

    @property
    def free(self) -> int:
        return sum(job is None for job in self.slots)

    @property
    def busy(self) -> bool:
        return any(job is not None for job in self.slots)

    def admit(self, jobs: list[_Job]) -> None:
        """Prefill `jobs` (at most `free` of them) into free slots together; each takes its first token. A job
        whose client has already gone is ended without a prefill. An error ends these jobs with it."""
        jobs = [job for job in jobs if not self._ended_if_cancelled(job)]
        if not jobs:
            return
        try:
            self._prefill(jobs)
        except BaseException as err:  # noqa: BLE001 - each of these requests gets the error
            for job in jobs:
                if job in self.slots:
                    self._leave(job)
                if not job.finished:
                    self.finish(job, err)
            if not self.busy:
                self.decoder = None
        finally:
            self.select([job.model if job is not None else "" for job in self.slots])

    def _prefill(self, jobs: list[_Job]) -> None:
        from .slots import SlotDecoder

        need = max(job.need for job in jobs)
        if self.decoder is None or need > self.decoder.width:
            width = max(MIN_WIDTH, need, 2 * self.decoder.width if self.decoder is not None else 0)
            width = min(width, max(need, self.context or width))
            self.decoder = (SlotDecoder(self.net, len(self.slots), width) if self.decoder is None
                            else self.decoder.widened(width))
        places = [i for i, job in enumerate(self.slots) if job is None][:len(jobs)]
        self.select([job.model for job in jobs])
        logits = self.decoder.prefill(places, [job.ids for job in jobs])
        self.stats["prefills"] += 1
        self.stats["rows"] += len(jobs)
        for place, job in zip(places, jobs):
            self.slots[place] = job
            if job.temperature > 0:
                job.generator = torch.Generator(device=self.device).manual_seed(SEED)
        self._take(logits, list(enumerate(jobs)))

    def step(self) -> bool:
        """One token for every request in a slot (after freeing the slots of those whose client left); whether a
        step was taken. An error ends every request in progress with it."""
        stepped = False
        self.drop_cancelled()
        if self.busy:
            try:
                logits = self.decoder.step(self.next_ids.to(self.decoder.device))
                self.stats["steps"] += 1
                stepped = True
                self._take(logits, [(i, job) for i, job in enumerate(self.slots) if job is not None])
            except BaseException as err:  # noqa: BLE001 - each request in progress gets the error
                self.fail_all(err)
        if not self.busy:
            self.decoder = None  # its memory back while nothing is decoded
        return stepped

    def _take(self, logits: torch.Tensor, rows: list[tuple[int, _Job]]) -> None:
        """Each job's next token from row i of logits [n, vocab]: greedy rows from one argmax over all rows (one
        wait for the device), sampled rows from their own generator. A job at its end leaves its slot."""
        best = logits.argmax(dim=-1).tolist() if any(job.generator is None for _, job in rows) else []
        for i, job in rows:
            if job.generator is None:
                t = best[i]
            else:
                t = int(choose_next(logits[i:i + 1], job.temperature, job.top_p, job.generator)[0])
            if t in self.eos:
                self._leave(job)
                self.finish(job)
                continue
            job.generated.append(t)
            self.stats["tokens"] += 1
            if job.stream is not None:
                job.stream.put(t)
            if len(job.generated) >= job.max_tokens:
                self._leave(job)
                self.finish(job)
            else:
                self.next_ids[self.slots.index(job)] = t

    def drop_cancelled(self) -> None:
        """End the requests in progress whose client went away; their slots are free at once."""
        for job in self.slots:
            if job is not None:
                self._ended_if_cancelled(job)
        if not self.busy:
            self.decoder = None

    def _ended_if_cancelled(self, job: _Job) -> bool:
        """End `job` now if its client went away (freeing its slot); whether it did."""
        if not job.cancelled.is_set():
            return False
        if job in self.slots:
            self._leave(job)
        self.stats["cancelled"] += 1
        self.finish(job)
        return True

    def _leave(self, job: _Job) -> None:
        place = self.slots.index(job)
        self.slots[place] = None
        job.generator = None
        if self.decoder is not None:
            self.decoder.release(place)

    def finish(self, job: _Job, error: BaseException | None = None) -> None:
        """Mark `job` finished with its reply so far (or `error`) and wake whoever waits for it."""
        job.finished, job.error = True, error
        job.result = (self.tokenizer.decode(job.generated, skip_special_tokens=True), len(job.ids),
                      len(job.generated))
        job.done.set()
        if job.stream is not None:
            job.stream.put(None)  # the end of the stream, whatever happened
        if job.on_done is not None:
            job.on_done()

    def fail_all(self, error: BaseException) -> None:
        """End every request in progress with `error` and drop the cache (its state is not to be trusted)."""
        for job in self.slots:
            if job is not None:
                self._leave(job)
                self.finish(job, error)
        self.decoder = None
