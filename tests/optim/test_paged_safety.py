"""Paged-state allocation asks the driver for nothing it cannot satisfy (the CUDA runtime is faked here)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from qlorakit.optim import PagedMemoryError
from qlorakit.optim import paged as paged_module
from qlorakit.optim.cudart import DEV_ATTR_CONCURRENT_MANAGED_ACCESS

GIB = 2**30


class FakeRuntime:
    def __init__(self, concurrent: int = 1):
        self.concurrent = concurrent
        self.mallocs: list[int] = []

    def device_attribute(self, attr: int, index: int) -> int:
        return self.concurrent if attr == DEV_ATTR_CONCURRENT_MANAGED_ACCESS else 1

    def set_device(self, index: int) -> None:
        pass

    def malloc_managed(self, nbytes: int) -> int:
        self.mallocs.append(nbytes)
        raise AssertionError("cudaMallocManaged must not be called in these tests")


@pytest.fixture
def fake_card(monkeypatch):
    """A card with `free` bytes free; torch holds `reserved` bytes of which `allocated` are in use."""
    card = {"free": 10 * GIB, "total": 80 * GIB, "reserved": 0, "allocated": 0, "emptied": 0}
    rt = FakeRuntime()

    def empty_cache():
        card["emptied"] += 1
        card["free"] += card["reserved"] - card["allocated"]
        card["reserved"] = card["allocated"]

    monkeypatch.setattr(paged_module, "cuda_runtime", lambda: rt)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda idx=None: (card["free"], card["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda idx=None: card["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda idx=None: card["allocated"])
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "device", lambda idx: contextlib.nullcontext())
    return card, rt


def test_a_request_beyond_free_memory_is_refused_before_any_allocation(fake_card):
    card, rt = fake_card
    with pytest.raises(PagedMemoryError, match="can hang the GPU, so nothing was allocated"):
        paged_module.allocate_managed(10 * GIB - paged_module.FREE_MEMORY_MARGIN + 1, torch.device("cuda", 0))
    assert rt.mallocs == [] and card["emptied"] == 0  # torch held no spare cache to hand back


def test_torch_cache_is_handed_back_once_before_refusing(fake_card):
    card, rt = fake_card
    card.update(free=1 * GIB, reserved=6 * GIB, allocated=5 * GIB)
    with pytest.raises(PagedMemoryError, match="only 2.00 GiB of its 80.00 GiB are free"):
        paged_module.allocate_managed(3 * GIB, torch.device("cuda", 0))
    assert card["emptied"] == 1 and rt.mallocs == []


def test_a_card_that_cannot_page_on_demand_is_refused(fake_card):
    _, rt = fake_card
    rt.concurrent = 0
    with pytest.raises(PagedMemoryError, match="ConcurrentManagedAccess"):
        paged_module.allocate_managed(1024, torch.device("cuda", 0))
    assert rt.mallocs == []


def test_paged_states_are_refused_on_a_cpu_device():
    with pytest.raises(PagedMemoryError, match="need a CUDA device"):
        paged_module.check_managed_support(torch.device("cpu"))


def test_a_request_that_fits_with_the_margin_goes_to_the_driver(fake_card):
    _, rt = fake_card
    with pytest.raises(AssertionError, match="must not be called"):  # the fake stops at cudaMallocManaged
        paged_module.allocate_managed(10 * GIB - paged_module.FREE_MEMORY_MARGIN, torch.device("cuda", 0))
    assert rt.mallocs == [10 * GIB - paged_module.FREE_MEMORY_MARGIN]
