"""Configurations that must be equivalent give the same loss and gradients through the training code path:
packed and unpacked batches of the same examples, and batch 4 x accumulation 1 against batch 1 x accumulation 4.
The model is the tiny Llama quantized to NF4 with LoRA adapters whose B matrices are nonzero, in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_helpers import randomize_lora_b

from qlorakit.data import IGNORE_INDEX, TokenizedExamples, epoch_batches
from qlorakit.model.loader import load_model
from qlorakit.model.lora_inject import inject_lora
from qlorakit.train.loop import accumulate_gradients, forward_loss_sum
from qlorakit.train.runtime import Runtime

RUNTIME = Runtime(torch.device("cpu"), torch.float32, torch.float32)
PAD_ID = 1


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir):
    net, _ = load_model(tiny_model_dir, compute_dtype=torch.float32, attn_implementation=request.param,
                        progress=False)
    inject_lora(net, "all-linear", r=8, alpha=16, dropout=0.0)
    randomize_lora_b(net, 0.1, seed=0)
    net.train()
    return net, request.param


@pytest.fixture(scope="module")
def examples() -> TokenizedExamples:
    """16 examples of 6 to 20 tokens; the loss covers each one's second half (a response after a prompt)."""
    rng = np.random.default_rng(0)
    pieces = []
    for i, n in enumerate(rng.integers(6, 21, size=16)):
        ids = rng.integers(2, 300, size=n).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2:]
        pieces.append((ids, labels, i))
    return TokenizedExamples.from_pieces(pieces)


def _lora_grads(net) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad(set_to_none=True)
    return grads


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max()
        assert scale > 0, f"{name}: zero gradient, the comparison would say nothing"
        err = (a[name] - b[name]).abs().max() / scale
        assert err < rtol, f"{name}: relative difference {err:.2e}"


def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(model, examples):
    net, attn = model
    packed_rows = [[0, 1, 2], [3, 4], [5, 6, 7]]
    unpacked_rows = [[i] for row in packed_rows for i in row]
    packed = examples.collate(packed_rows, PAD_ID)
    unpacked = examples.collate(unpacked_rows, PAD_ID)
    assert packed["input_ids"].shape[0] == 3 and unpacked["input_ids"].shape[0] == 8

    loss_packed = forward_loss_sum(net, packed, RUNTIME, packing=True, attn_implementation=attn)
    loss_packed.backward()
    grads_packed = _lora_grads(net)
    loss_unpacked = forward_loss_sum(net, unpacked, RUNTIME, packing=False, attn_implementation=attn)
    loss_unpacked.backward()
    grads_unpacked = _lora_grads(net)

    assert loss_packed.dtype == torch.float32
    assert loss_packed.item() == pytest.approx(loss_unpacked.item(), rel=1e-5)
    _assert_close(grads_packed, grads_unpacked, rtol=1e-5)


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_batch_4_by_accumulation_1_equals_batch_1_by_accumulation_4(model, examples, packing):
    net, attn = model
    # The plan takes the same examples in the same order whatever the batch size; one step is 4 rows either way.
    lengths = examples.lengths
    plan_4 = epoch_batches(lengths, 4, 32, packing, seed=3, epoch=0)
    plan_1 = epoch_batches(lengths, 1, 32, packing, seed=3, epoch=0)
    assert [row for batch in plan_4 for row in batch] == [row for batch in plan_1 for row in batch]
    step_rows = plan_4[0]
    assert len(step_rows) == 4

    loss_4x1 = accumulate_gradients(net, [examples.collate(step_rows, PAD_ID)], RUNTIME, packing, attn)
    grads_4x1 = _lora_grads(net)
    loss_1x4 = accumulate_gradients(net, [examples.collate([row], PAD_ID) for row in step_rows], RUNTIME,
                                    packing, attn)
    grads_1x4 = _lora_grads(net)

    assert loss_4x1 == pytest.approx(loss_1x4, rel=1e-6)
    _assert_close(grads_4x1, grads_1x4, rtol=1e-5)
