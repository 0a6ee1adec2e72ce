"""Activation offloading (model/offload.py) against checkpointing and keeping everything, on the CPU.

The device copy is a stand-in (HostCopies) that keeps its own copies and counts what moved, so the bookkeeping is
checked here: which layer inputs leave, which come back and in what order (each reload started one layer ahead),
and that nothing is held once backward is done. Gradients of every LoRA weight and of the loss are bit-identical
across keep / recompute / offload, with LoRA dropout (the recompute must redraw the same masks), with the fused
Llama block paths and without them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from qlorakit.model.fused_blocks import enable_fused_blocks
from qlorakit.model.lora_inject import enable_activation_checkpointing, inject_lora
from qlorakit.model.offload import LayerInputOffload, decoder_layers, offload_layer_inputs, stop_offloading
from qlorakit.model.synthetic import synthetic_llama

LAYERS = 4
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 64, "tie_word_embeddings": False}


class HostCopies:
    """A stand-in for CudaMover: 'host' copies are clones; every move is logged."""

    def __init__(self):
        self.host: dict[int, torch.Tensor] = {}
        self.log: list[tuple[str, int]] = []

    def to_host(self, key: int, t: torch.Tensor) -> None:
        self.host[key] = t.clone()
        self.log.append(("out", key))

    def start_reload(self, key: int):
        self.log.append(("reload", key))
        return key, self.host[key].clone()

    def finish_reload(self, pending) -> torch.Tensor:
        key, t = pending
        self.log.append(("ready", key))
        return t


def _model(fused: bool, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama with 4-bit block linears (built in NF4, as benchmarks/train_step.py does) and LoRA r=4,
    dropout 0.1; `fused`: through the fused block paths (which need the 4-bit weights without dense copies)."""
    model = synthetic_llama(TINY, device="cpu", compute_dtype=torch.float32, seed=seed, std=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A's initialisation
        inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero B, so every adapter path carries gradient
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    if fused:
        report = enable_fused_blocks(model)
        assert "not fused" not in report.line(), report.line()
    model.train()
    return model


def _grads(model, ids, seed: int = 7) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)  # the dropout masks of this step
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.mark.parametrize("fused", [False, True], ids=["transformers-modules", "fused-blocks"])
def test_offload_recompute_and_keep_give_identical_gradients(fused):
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    keep = _grads(_model(fused), ids)

    recompute_model = _model(fused)
    enable_activation_checkpointing(recompute_model)
    recompute = _grads(recompute_model, ids)

    offload_model = _model(fused)
    enable_activation_checkpointing(offload_model)
    mover = HostCopies()
    offload = offload_layer_inputs(offload_model, list(range(LAYERS)), mover)
    offloaded = _grads(offload_model, ids)

    assert keep[0] == recompute[0] == offloaded[0]
    assert keep[1].keys() == recompute[1].keys() == offloaded[1].keys() and len(keep[1]) == LAYERS * 7 * 2
    for name in keep[1]:
        assert torch.equal(keep[1][name], recompute[1][name]), name
        assert torch.equal(keep[1][name], offloaded[1][name]), name
    assert all(g.abs().sum() > 0 for g in offloaded[1].values())

    # Bookkeeping: layers 0..2 went out in forward order; the last one kept its input on the device. Backward
    # reloads each one layer ahead of its use: the reload of layer k starts during layer k+1's backward.
    top = LAYERS - 1
    assert mover.log[:top] == [("out", k) for k in range(top)]
    back = mover.log[top:]
    assert back == [event for k in reversed(range(top)) for event in (("reload", k), ("ready", k))]
    assert offload.on_device == {} and offload.pending == {}  # nothing held after backward


def test_a_second_step_reuses_the_offload_and_matches_recompute():
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(4))
    recompute_model = _model(False)
    enable_activation_checkpointing(recompute_model)
    offload_model = _model(False)
    enable_activation_checkpointing(offload_model)
    offload_layer_inputs(offload_model, [0, 2], HostCopies())  # layers 1 and 3 keep plain checkpointing
    for step in range(2):
        loss_r, grads_r = _grads(recompute_model, ids, seed=10 + step)
        loss_o, grads_o = _grads(offload_model, ids, seed=10 + step)
        assert loss_r == loss_o
        assert all(torch.equal(grads_r[n], grads_o[n]) for n in grads_r)


def test_stop_offloading_restores_checkpointing_and_bad_setups_are_refused():
    model = _model(False)
    with pytest.raises(ValueError, match="enable checkpointing first"):
        offload_layer_inputs(model, [0], HostCopies())
    enable_activation_checkpointing(model)
    before = [layer._gradient_checkpointing_func for layer in decoder_layers(model)]
    assert offload_layer_inputs(model, [], HostCopies()) is None
    offload_layer_inputs(model, [1, 3], HostCopies())
    stop_offloading(model)
    assert [layer._gradient_checkpointing_func for layer in decoder_layers(model)] == before


def test_an_abandoned_forward_leaves_nothing_held():
    offload = LayerInputOffload(HostCopies(), [0, 1, 2])
    offload.store(0, torch.ones(3))
    offload.store(2, torch.ones(3))  # the highest layer keeps its input on the device
    assert 2 in offload.on_device
    offload.store(0, torch.zeros(3))  # the next forward starts without a backward (an exception in between)
    assert offload.on_device == {}


def test_a_pass_without_gradients_moves_nothing_and_the_next_step_still_matches():
    """A forward under no_grad in train mode (DPO's reference pass, eval inside training) copies no layer input to
    the host: no backward will ask for it. The training step after it keeps recompute's gradients."""
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(5))
    recompute_model = _model(True)
    enable_activation_checkpointing(recompute_model)
    offload_model = _model(True)
    enable_activation_checkpointing(offload_model)
    mover = HostCopies()
    offload_layer_inputs(offload_model, [0, 1, 2, 3], mover)
    with torch.no_grad():
        torch.manual_seed(3)
        logits_o = offload_model(input_ids=ids, use_cache=False).logits
        torch.manual_seed(3)
        logits_r = recompute_model(input_ids=ids, use_cache=False).logits
        # The hook itself, as a transformers release that calls it whatever the grad mode would (5.24 does not).
        hidden = torch.randn(2, 24, 64)
        assert torch.equal(decoder_layers(offload_model)[1]._gradient_checkpointing_func(torch.neg, hidden), -hidden)
    assert mover.log == [] and mover.host == {}
    assert torch.equal(logits_o, logits_r)
    loss_r, grads_r = _grads(recompute_model, ids)
    loss_o, grads_o = _grads(offload_model, ids)
    assert loss_r == loss_o and ("out", 0) in mover.log
    assert all(torch.equal(grads_r[n], grads_o[n]) for n in grads_r)
