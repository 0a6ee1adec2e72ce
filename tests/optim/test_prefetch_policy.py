"""When paged states are prefetched (optim/paged.py PrefetchPolicy), driven here by a fake clock in place of CUDA
events: 'auto' makes no prefetch call while nothing is evicted, starts after an update that ran on evicted pages
(page faults make it slow), keeps going while prefetches move pages, and stops after QUIET_UPDATES quiet ones;
'always' and 'never' do what they say. The GPU side (real events, real migrations) is benchmarks/optim.py's."""

from __future__ import annotations

import pytest

from qlorakit.optim.errors import PagedMemoryError
from qlorakit.optim.paged import PrefetchPolicy

RESIDENT_MS = 3.0  # an update on resident states
FAULT_MS = 100.0  # the same update on evicted states, pages brought back by faults
MIGRATE_MS = 29.0  # a bulk prefetch that moves the evicted states back


class Card:
    """A fake GPU stream: a clock, states resident or evicted, events that read the clock when recorded."""

    def __init__(self):
        self.now = 0.0
        self.evicted = False
        self.prefetch_calls = 0

    def event(self):
        card = self

        class Event:
            t = None

            def record(self):
                self.t = card.now

            def query(self):
                return True

            def elapsed_time(self, other):
                return other.t - self.t

        return Event()

    def prefetch(self):
        self.prefetch_calls += 1
        if self.evicted:
            self.now += MIGRATE_MS
            self.evicted = False

    def update(self, policy: PrefetchPolicy):
        policy.before_update()
        self.now += FAULT_MS if self.evicted else RESIDENT_MS
        self.evicted = False  # the faults brought the pages back
        policy.after_update()
        self.now += 500.0  # the rest of the training step


def _policy(card: Card, mode: str) -> PrefetchPolicy:
    return PrefetchPolicy(mode, prefetch_fn=card.prefetch, event_fn=card.event)


def test_auto_makes_no_prefetch_call_while_nothing_is_evicted():
    card = Card()
    policy = _policy(card, "auto")
    for _ in range(50):
        card.update(policy)
    assert card.prefetch_calls == 0 and policy.stats["evictions_seen"] == 0
    assert policy.stats["updates_timed"] == 49 and policy.fastest_ms == RESIDENT_MS


def test_auto_prefetches_after_an_eviction_while_evictions_go_on_then_stops():
    card = Card()
    policy = _policy(card, "auto")
    for _ in range(5):
        card.update(policy)
    card.evicted = True
    card.update(policy)  # runs on evicted pages: slow, by page faults
    assert card.prefetch_calls == 0
    card.update(policy)  # the slow update is seen: this one prefetches (nothing to move: faults did it)
    assert card.prefetch_calls == 1 and policy.prefetching
    for _ in range(3):  # the driver keeps evicting between steps: every prefetch moves the states back
        card.evicted = True
        card.update(policy)
    assert card.prefetch_calls == 4 and policy.prefetching
    calls = card.prefetch_calls
    for _ in range(PrefetchPolicy.QUIET_UPDATES + 5):  # pressure is over
        card.update(policy)
    assert not policy.prefetching
    assert card.prefetch_calls - calls == PrefetchPolicy.QUIET_UPDATES  # each read back at the next update
    assert policy.stats["evictions_seen"] == 1 + 3
    assert policy.fastest_ms == RESIDENT_MS  # the faulting update did not become the baseline


def test_always_prefetches_every_update_and_never_never_does():
    card = Card()
    always = _policy(card, "always")
    for _ in range(30):
        card.update(always)
    assert card.prefetch_calls == 30 and always.prefetching
    card = Card()
    never = _policy(card, "never")
    card.update(never)
    card.evicted = True
    for _ in range(5):
        card.update(never)
    assert card.prefetch_calls == 0 and never.stats["evictions_seen"] == 1


def test_updates_whose_events_are_not_done_are_reviewed_later():
    card = Card()
    policy = _policy(card, "auto")
    card.update(policy)
    pending = policy._pending
    pending[2].query = lambda: False  # the last update has not finished on the GPU yet
    card.update(policy)  # no waiting: the review is skipped, nothing decided
    assert policy.stats["updates_timed"] == 0


def test_unknown_modes_are_refused():
    with pytest.raises(PagedMemoryError, match="sometimes"):
        PrefetchPolicy("sometimes")
    with pytest.raises(PagedMemoryError, match="sometimes"):
        PrefetchPolicy("auto").set_mode("sometimes")


def test_a_new_mode_starts_afresh():
    card = Card()
    policy = _policy(card, "never")
    card.update(policy)
    card.evicted = True
    card.update(policy)  # slow, under 'never'
    policy.set_mode("auto")
    card.update(policy)  # the slow update was timed under 'never': it does not switch prefetching on
    assert not policy.prefetching and card.prefetch_calls == 0
