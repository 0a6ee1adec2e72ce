"""One optimizer step and the eval pass of a preference objective (train/preference.py's losses), as the loop
calls them in place of the SFT token loss.

A step's loss is the mean over all its pairs: each micro-batch's mean is weighted by its share of the step's
pairs, so splitting a step into micro-batches does not change the gradient (for ORPO, whose NLL is a token mean
within a micro-batch as in TRL, up to that term). The reference forward (DPO, IPO) runs without gradients with
the adapters switched off, on the same micro-batch, right before the policy forward, unless the batch carries
the pairs' precomputed reference log-probs (training.precompute_ref_logps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .distributed import SINGLE_PROCESS, DistContext
from .preference import (NEEDS_REFERENCE, PreferenceSettings, SequenceLogps, floats, logp_index, preference_loss,
                         reference_logps, sequence_logps)
from .runtime import Runtime
from .shared_prompt import layout_for


def _on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()
            if k in ("input_ids", "attention_mask", "completion_mask", "ref_logps")}


def _pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0] // 2


def micro_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], runtime: Runtime,
                     s: PreferenceSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over one micro-batch's pairs and its metrics as 0-dim tensors (preference_loss's lazy ones:
    read them after backward is queued). Gradients flow into the adapters."""
    layout = layout_for(model, batch, runtime.compute_dtype) if s.share_prompts else None
    nll = s.objective == "orpo"
    # the positions that count, as indices made on the CPU (reading a boolean mask on the GPU would wait for it);
    # the reference forward (dpo, ipo: objectives without ORPO's NLL rows) reads the same ones
    index = logp_index(batch, nll, layout)
    batch = _on_device(batch, runtime.device)
    layout = None if layout is None else layout.to(runtime.device)
    index = index.to(runtime.device)
    with runtime.autocast():
        reference = None
        if "ref_logps" in batch:  # precomputed (train/reference_cache.py): no reference forward
            ref = batch["ref_logps"]
            reference = SequenceLogps(ref[:, 0], ref[:, 1], ref.new_zeros(len(ref)), ref.new_zeros(len(ref)))
        elif s.objective in NEEDS_REFERENCE:
            reference = reference_logps(model, batch, s.reference_adapter, layout, index)
        policy = sequence_logps(model, batch, with_nll=nll, layout=layout, index=index)
        return preference_loss(s, policy, reference, lazy=True)


def _weighted(total: dict[str, float], metrics: dict[str, float], weight: float) -> None:
    for k, v in metrics.items():
        total[k] = total.get(k, 0.0) + v * weight


def accumulate_preference(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], runtime: Runtime,
                          s: PreferenceSettings, dist: DistContext = SINGLE_PROCESS,
                          before_backward: Callable[[int], None] | None = None) -> tuple[float, dict[str, float]]:
    """Backpropagate one optimizer step's loss (the mean over its pairs); return it and the step's metrics."""
    n_pairs = max(1, sum(_pairs(b) for b in micro_batches))
    parts = []
    for i, batch in enumerate(dist.my_share(micro_batches)):
        loss, m = micro_batch_loss(model, batch, runtime, s)
        weight = _pairs(batch) / n_pairs
        if before_backward is not None:
            before_backward(i)
        (loss * weight).backward()
        parts.append((loss.detach(), m, weight))
    # read once every backward is queued: no micro-batch waits for the one before it
    loss_sum, metrics = sum(float(loss) * weight for loss, _, weight in parts), {}
    for _, m, weight in parts:
        _weighted(metrics, floats(m), weight)
    if dist.enabled:
        dist.sum_gradients([p for p in model.parameters() if p.requires_grad])
        keys = sorted(metrics)
        summed = dist.sum_floats([loss_sum, *(metrics[k] for k in keys)], runtime.device)
        loss_sum, metrics = summed[0], dict(zip(keys, summed[1:]))
    return loss_sum, metrics


@torch.no_grad()
def evaluate_preference(model: nn.Module, examples, batch_size: int, max_seq_length: int, seed: int,
                        runtime: Runtime, pad_id: int, s: PreferenceSettings) -> dict[str, float]:
    """Mean loss and metrics over held-out pairs, as `eval_loss` and `eval_<metric>` (one process)."""
    from ..data import epoch_batches

    was_training = model.training
    model.eval()
    plan = epoch_batches(examples.lengths, batch_size, max_seq_length, False, seed=seed, epoch=0)
    n_pairs = max(1, len(examples))
    loss_sum, metrics = 0.0, {}
    for rows in plan:
        batch = examples.collate(rows, pad_id)
        loss, m = micro_batch_loss(model, batch, runtime, s)
        weight = _pairs(batch) / n_pairs
        loss_sum += float(loss) * weight
        _weighted(metrics, floats(m), weight)
    model.train(was_training)
    return {"eval_loss": loss_sum, **{f"eval_{k}": v for k, v in metrics.items()}, "eval_pairs": len(examples)}
