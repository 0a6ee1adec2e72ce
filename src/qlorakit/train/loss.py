"""Causal-LM loss from the decoder's hidden states, in chunks, so that fp32 logits for the whole batch never
exist at once (the logits of one chunk are recomputed in backward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.pieces import IGNORE_INDEX


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss_sum(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Sum over target tokens of -log p(label[t+1] | ... t).

    hidden: [B, T, H] (compute dtype); lm_head_weight: [V, H]; labels: [B, T] int64 with IGNORE_INDEX where no
    loss is taken. Returns an fp32 scalar: the SUM (callers divide by the token count of the whole optimizer
    step, so that micro-batching does not change the gradient).
    """
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    t = labels[:, 1:].reshape(-1)
    keep = t != IGNORE_INDEX
    h, t = h[keep], t[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, t.numel(), chunk_tokens):
        hs, ts = h[start : start + chunk_tokens], t[start : start + chunk_tokens]
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, hs, lm_head_weight, ts, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hs, lm_head_weight, ts)
    return total


def count_targets(labels: torch.Tensor) -> int:
    """Target tokens of a batch: labels [B, T] int64 positions 1.. that are not IGNORE_INDEX (what the loss sums)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def decoder_loss_sum(lm: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """causal_lm_loss_sum of a causal LM's decoder hidden states and its head's weight (no logits tensor)."""
    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    return causal_lm_loss_sum(hidden, lm.get_output_embeddings().weight, labels)
