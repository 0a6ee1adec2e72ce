"""One micro-batch's summed loss (training and eval share it), and the eval pass over held-out examples."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .distributed import SINGLE_PROCESS, DistContext
from .fsdp import loss_root
from .loss import count_targets, decoder_loss_sum
from .runtime import Runtime

if TYPE_CHECKING:
    from .loop import LoopSettings

def _model_inputs(batch: dict[str, torch.Tensor], packing: bool, attn_implementation: str,
                  dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    from ..data import packed_attention_mask

    inputs: dict[str, Any] = {
        "input_ids": batch["input_ids"].to(device),
        "position_ids": batch["position_ids"].to(device),
    }
    if packing and attn_implementation != "flash_attention_2":
        # transformers isolates packed examples only with an explicit block-diagonal mask (or flash-attn varlen).
        inputs["attention_mask"] = packed_attention_mask(batch["segment_ids"], dtype).to(device)
    elif not packing:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    return inputs


def forward_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], runtime: Runtime, packing: bool,
                     attn_implementation: str) -> torch.Tensor:
    """Summed token loss of one micro-batch (fp32 scalar), from the decoder's hidden states."""
    inputs = _model_inputs(batch, packing, attn_implementation, runtime.compute_dtype, runtime.device)
    labels = batch["labels"].to(runtime.device)
    root = loss_root(model)
    with runtime.autocast():
        if root is not None:  # sharded (FSDP2): the same computation inside the root module's forward
            return root(inputs, labels)
        return decoder_loss_sum(model, inputs, labels)


@torch.no_grad()
def evaluate(model: nn.Module, examples, settings: LoopSettings, runtime: Runtime, pad_id: int,
             dist: DistContext = SINGLE_PROCESS) -> dict[str, float]:
    """Mean token loss over `examples`; data-parallel, each rank takes its share of the batches and the sums are
    all-reduced."""
    from ..data import epoch_batches

    was_training = model.training
    model.eval()
    plan = epoch_batches(examples.lengths, settings.batch_size, settings.max_seq_length, settings.packing,
                         seed=settings.seed, epoch=0)
    total, count = 0.0, 0
    share: list = dist.my_share(plan)
    rounds = len(share)
    if dist.sharded:  # every rank must join every forward's collectives: pad with repeats that are not counted
        rounds = -(-len(plan) // dist.world_size)
    for i in range(rounds):
        rows = share[i] if i < len(share) else plan[0]
        batch = examples.collate(rows, pad_id)
        part = float(forward_loss_sum(model, batch, runtime, settings.packing, settings.attn_implementation))
        if i < len(share):
            total += part
            count += count_targets(batch["labels"])
    if dist.enabled:
        total, summed = dist.sum_floats([total, count], runtime.device)
        count = int(summed)
    model.train(was_training)
    loss = total / max(1, count)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}
