"""Saved activations in host memory (model/offload_saved.py, training.host_activations_gib) on the CPU.

The device copy is a stand-in (SavedCopies) that keeps its own clones and logs every move, so the bookkeeping is
checked here: which tensors leave in forward (not the parameters, the 4-bit weights or small ones), that the device
tensors are then free, that backward brings a layer back at its first use and the next hosted layer below one layer
ahead, and that nothing is held once backward is done. Gradients and loss are bit-identical to keeping the
activations and to recomputing them.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from qlorakit.model.fused_blocks import keep_activations, keep_plan, layer_activation_bytes
from qlorakit.model.lora_inject import enable_activation_checkpointing
from qlorakit.model.offload import decoder_layers, stop_offloading
from qlorakit.model.offload_saved import IN_FLIGHT_LAYERS, host_saved_activations

from test_offload import LAYERS, TINY, _grads, _model


class SavedCopies:
    """A stand-in for SavedCudaMover: 'host' copies are clones; every move is logged."""

    def __init__(self):
        self.host: dict[tuple[int, int], torch.Tensor] = {}
        self.log: list[tuple] = []

    def to_host(self, key, t: torch.Tensor) -> None:
        self.host[key] = t.clone()
        self.log.append(("out", *key))

    def wait_stored(self, key) -> None:
        self.log.append(("wait", *key))

    def start_reload(self, key):
        self.log.append(("reload", *key))
        return key, self.host[key].clone()

    def finish_reload(self, pending) -> torch.Tensor:
        key, t = pending
        self.log.append(("ready", *key))
        return t


@pytest.fixture(autouse=True)
def _small_tensors_move(monkeypatch):
    monkeypatch.setattr("qlorakit.model.offload_saved.MIN_BYTES", 1024)  # the tiny model's tensors are small


@pytest.mark.parametrize("fused", [False, True], ids=["transformers-modules", "fused-blocks"])
def test_hosted_layers_give_the_gradients_of_kept_and_recomputed_ones(fused):
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    keep = _grads(_model(fused), ids)

    recompute_model = _model(fused)
    enable_activation_checkpointing(recompute_model)
    recompute = _grads(recompute_model, ids)

    hosted_model = _model(fused)
    enable_activation_checkpointing(hosted_model)
    mover = SavedCopies()
    offload = host_saved_activations(hosted_model, list(range(LAYERS)), mover)
    hosted = _grads(hosted_model, ids)

    assert keep[0] == recompute[0] == hosted[0]
    assert keep[1].keys() == hosted[1].keys() and len(keep[1]) == LAYERS * 7 * 2
    for name in keep[1]:
        assert torch.equal(keep[1][name], hosted[1][name]), name
        assert torch.equal(recompute[1][name], hosted[1][name]), name
    assert all(g.abs().sum() > 0 for g in hosted[1].values())

    # Forward: every layer moved tensors, in layer order; the frozen weights and the adapters stayed.
    outs = [e for e in mover.log if e[0] == "out"]
    assert [k for _, k, _ in outs] == sorted(k for _, k, _ in outs) and {k for _, k, _ in outs} == set(range(LAYERS))
    assert all(offload.counts[k] >= 2 for k in range(LAYERS)) and offload.stayed > 0
    frozen_ptrs = {p.untyped_storage().data_ptr() for p in hosted_model.parameters()}
    assert all(t.untyped_storage().data_ptr() not in frozen_ptrs for t in mover.host.values())
    # From layer IN_FLIGHT_LAYERS on, a layer's forward first lets go of the layer that many below (the compute
    # stream waits for its copies); the last hosted layer lets go of the rest. Each layer is waited for once, for
    # its last copy.
    first_reload = next(i for i, e in enumerate(mover.log) if e[0] == "reload")
    waits = [e for e in mover.log[:first_reload] if e[0] == "wait"]
    assert [w[1] for w in waits] == list(range(LAYERS))
    assert [w[1] for w in mover.log[:first_reload] if w[0] == "wait" and mover.log.index(w) < mover.log.index(
        ("out", LAYERS - 1, 0))] == list(range(LAYERS - IN_FLIGHT_LAYERS))
    assert all(w[2] == offload.counts[w[1]] - 1 for w in waits)
    # Backward: a layer comes back at its first use, and the next one below starts coming back then too (for the
    # top layer both at once; each later layer was prefetched while the one above it was differentiated).
    back = [e for e in mover.log if e[0] in ("reload", "ready")]
    reload_layers = [k for kind, k, _ in back if kind == "reload"]
    assert reload_layers == sorted(reload_layers, reverse=True)
    first = {(kind, k): next(i for i, e in enumerate(back) if e[:2] == (kind, k))
             for kind in ("reload", "ready") for k in range(LAYERS)}
    for k in range(LAYERS - 1):
        assert first[("reload", k)] < first[("ready", k + 1)], k
    assert sorted((k, i) for kind, k, i in back if kind == "ready") == sorted(mover.host)
    assert len(reload_layers) == len(mover.host)  # every moved tensor came back exactly once
    assert offload.pending == {} and offload.current == {} and offload.loaded == {}  # released at backward end


def test_moved_tensors_are_free_on_the_device_after_forward():
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(5))
    model = _model(True)
    enable_activation_checkpointing(model)
    offload = host_saved_activations(model, list(range(LAYERS)), SavedCopies())
    given: list[tuple[int, weakref.ref]] = []
    pack = offload.pack

    def watching_pack(key, t):  # what autograd handed over, and whether it was moved
        handle = pack(key, t)
        if handle is not t:
            given.append((key, weakref.ref(t)))
        return handle

    offload.pack = watching_pack
    embedded = []
    model.model.embed_tokens.register_forward_hook(lambda mod, args, out: embedded.append(weakref.ref(out)))
    torch.manual_seed(7)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    gc.collect()
    # While the graph waits for backward no moved tensor is held on the device (the last hosted layer let go of
    # all, its compute stream waiting for their copies), but for the frozen embeddings' output (layer 0's input),
    # which something outside the layers keeps alive (it does so without the hooks too), so its copy frees
    # nothing: one [B, T, hidden] tensor.
    alive = [(k, tuple(r().shape)) for k, r in given if r() is not None]
    assert {k for k, _ in given} == set(range(LAYERS)) and offload.inflight == {}
    assert alive == [(0, (2, 24, TINY["hidden_size"]))]
    assert embedded[0]() is not None and embedded[0]() is given[0][1]()
    loss.backward()
    gc.collect()
    assert all(r() is None for _, r in given[1:]) and offload.inflight == {}


def test_a_second_step_and_an_abandoned_forward():
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(4))
    keep_model = _model(False)
    hosted_model = _model(False)
    enable_activation_checkpointing(hosted_model)
    offload = host_saved_activations(hosted_model, [1, 2], SavedCopies())  # 0 and 3 plain checkpointing
    for step in range(2):
        loss_k, grads_k = _grads(keep_model, ids, seed=10 + step)
        loss_h, grads_h = _grads(hosted_model, ids, seed=10 + step)
        assert loss_k == loss_h
        assert all(torch.equal(grads_k[n], grads_h[n]) for n in grads_k)
    moves = len(offload.mover.log)
    with torch.no_grad():  # no graph: nothing is saved, nothing moves, no layer is begun
        hosted_model(input_ids=ids, use_cache=False)
        hidden = torch.randn(2, 24, 64)  # the hook itself (a transformers release may call it in no_grad)
        assert torch.equal(decoder_layers(hosted_model)[1]._gradient_checkpointing_func(torch.neg, hidden), -hidden)
    assert offload.pending == {} and len(offload.mover.log) == moves
    offload.pending[(2, 0)] = offload.mover.start_reload((2, 0))  # as if a backward stopped half-way
    offload.begin(1)  # a new forward pass starts at the lowest hosted layer: an abandoned one's reloads go
    assert offload.pending == {}


def test_stop_offloading_gives_hosted_layers_their_checkpointing_back():
    model = _model(False)
    enable_activation_checkpointing(model)
    layers = decoder_layers(model)
    layers[3].gradient_checkpointing = False  # a kept layer
    before = [(layer.gradient_checkpointing, layer._gradient_checkpointing_func) for layer in layers]
    assert host_saved_activations(model, [], SavedCopies()) is None
    host_saved_activations(model, [2, 3], SavedCopies())
    assert layers[3].gradient_checkpointing and layers[2]._gradient_checkpointing_func is not before[2][1]
    stop_offloading(model)
    assert [(layer.gradient_checkpointing, layer._gradient_checkpointing_func) for layer in layers] == before


def test_the_plan_keeps_the_top_layers_hosts_the_next_and_recomputes_the_rest():
    model = _model(True)
    enable_activation_checkpointing(model)
    tokens = 48
    small, large = layer_activation_bytes(model.config, tokens)
    plan = keep_activations(model, tokens, small, 2 * small + small // 2)  # one kept, two hosted, one recomputed
    layers = decoder_layers(model)
    assert (plan.kept, plan.with_gate_up, plan.hosted, plan.hosted_indices) == (1, 0, 2, (1, 2))
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, False, False]
    assert [layer.mlp.keep_gate_up for layer in layers] == [True, False, False, False]
    assert plan.host_bytes == 2 * small and plan.bytes == small
    assert "2 keep theirs in pinned host memory" in plan.line(tokens, 1.0, 2.0) and "1 are recomputed" in \
        plan.line(tokens, 1.0, 2.0)
    assert keep_plan(32, 32, 100, 300, 0, 10_000) == keep_plan(32, 32, 100, 300, 0, 3_200)  # at most every layer
    assert keep_plan(32, 30, 100, 300, 500, 10_000).hosted == 25  # fused layers not kept: all hosted
