"""Preference objectives on the 4-bit base: DPO (sigmoid), IPO, ORPO and SimPO, from per-sequence log-probs.

A preference batch holds each pair's chosen rows first and its rejected rows after them (as TRL's DPOTrainer
concatenates them), so both run in one forward: input_ids, attention_mask and completion_mask [2N, T] (the
completion mask marks the response tokens, EOS included). Log-probs come from the decoder's hidden states and the
frozen LM head through `loss.linear_cross_entropy_rows` (chunks of logits, no full-vocabulary fp32 tensor).

The reference of DPO and IPO is the policy with its adapters switched off (`nn.lora.adapters_disabled`): the 4-bit
base itself, never a second copy of it; or, with training.reference_adapter, the base with a frozen copy of the
adapter the policy started from (TRL's "ref" adapter), swapped in for the reference forward. ORPO and SimPO need no
reference. The formulas follow TRL's trainers, whose names the metrics keep (rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected):
  dpo    -log sigmoid(beta * ((c - c_ref) - (r - r_ref)))                    c, r: summed response log-probs
  ipo    ((c - c_ref) / n_c - (r - r_ref) / n_r - 1 / (2 beta))^2           n: response tokens
  orpo   nll(chosen, prompt and response) - beta * log sigmoid(log odds(c/n_c) - log odds(r/n_r))
  simpo  -(1 - eps) log sigmoid(beta * (c/n_c - r/n_r) - gamma) - eps log sigmoid(-(...))
each averaged over the pairs of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..nn.lora import adapter_weights_swapped, adapters_disabled
from .loss import linear_cross_entropy_rows
from .shared_prompt import SharedLayout

OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")
NEEDS_REFERENCE = ("dpo", "ipo")


@dataclass(frozen=True)
class PreferenceSettings:
    objective: str
    beta: float = 0.1
    label_smoothing: float = 0.0  # simpo: TRL's CPO trainer's conservative form
    simpo_gamma: float = 0.5
    # dpo/ipo: the frozen starting adapter (nn.lora.adapter_snapshot) whose model is the reference; None: the base
    reference_adapter: dict | None = field(default=None, compare=False, repr=False)
    share_prompts: bool = False  # each pair's prompt runs once (train/shared_prompt.py) where the model can

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: allowed {', '.join(OBJECTIVES)}")


@dataclass
class SequenceLogps:
    """Per pair: summed response log-probs and response token counts of the chosen and rejected rows; with
    `nll`, the mean negative log-likelihood of the chosen rows' every token (prompt and response: ORPO's)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    nll: torch.Tensor | None = None


def _hidden(lm: torch.nn.Module, batch: dict[str, torch.Tensor], layout: SharedLayout | None,
            right_padded: bool = False) -> torch.Tensor:
    """The decoder's last hidden states [2N, T, H] in TRL's layout (`right_padded`: without the padding mask,
    which changes none of the real tokens' states), or, with `layout`, [N, L, H] of the shared rows
    (train/shared_prompt.py)."""
    if layout is None:
        return lm.get_decoder()(input_ids=batch["input_ids"],
                                attention_mask=None if right_padded else batch["attention_mask"],
                                use_cache=False).last_hidden_state
    device = batch["input_ids"].device
    embed = lm.get_input_embeddings().weight
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else embed.dtype
    return lm.get_decoder()(input_ids=layout.input_ids, position_ids=layout.position_ids,
                            attention_mask=layout.mask(dtype), shared_rows=layout.rows,
                            use_cache=False).last_hidden_state


@dataclass(frozen=True)
class LogpIndex:
    """The positions of a preference batch that count, as index tensors made on the CPU, so that reading them on
    the GPU never waits for it (a boolean mask there would: its count must come back to the host first).
    rows [M]: flat positions in the decoder's hidden states [rows x length, H] whose next token is wanted
    (position t predicts token t + 1); targets [M]; response [R]: which of the M are response tokens, and
    response_seq [R] their sequence (0..2N-1); chosen [C]: which of the M are in chosen rows (ORPO's NLL, or
    None); counts [2N] float32: response tokens per sequence. right_padded: every row is its tokens then padding,
    so causal attention alone gives every token what the padding mask would (the decoder then runs without the
    mask: no host sync in transformers' mask code, and SDPA's causal kernels)."""

    rows: torch.Tensor
    targets: torch.Tensor
    response: torch.Tensor
    response_seq: torch.Tensor
    chosen: torch.Tensor | None
    counts: torch.Tensor
    right_padded: bool = False

    def to(self, device: torch.device) -> LogpIndex:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or device.type != "cuda":
                return None if t is None else t.to(device)
            return t.pin_memory().to(device, non_blocking=True)

        return LogpIndex(*(move(t) for t in (self.rows, self.targets, self.response, self.response_seq,
                                             self.chosen, self.counts)), self.right_padded)


def logp_index(batch: dict[str, torch.Tensor], with_nll: bool = False,
               layout: SharedLayout | None = None) -> LogpIndex:
    """The LogpIndex of `batch` in TRL's layout (read on the CPU: a CPU batch costs no wait), its rows counted in
    the shared rows of `layout` when given."""
    ids, attention, completion = (batch[k].cpu() for k in ("input_ids", "attention_mask", "completion_mask"))
    wanted = (attention[:, 1:] if with_nll else completion[:, 1:]).bool()
    seq, pos = wanted.nonzero(as_tuple=True)
    if layout is None:
        rows = seq * ids.shape[1] + pos
    else:  # each wanted position of TRL's layout, read from its pair's shared row
        rows = (seq % layout.pairs) * layout.input_ids.shape[1] + layout.col.cpu()[seq, pos]
    response = completion[:, 1:].bool()[seq, pos].nonzero().flatten()
    chosen = (seq < ids.shape[0] // 2).nonzero().flatten() if with_nll else None
    right_padded = torch.equal(attention.bool(), torch.arange(ids.shape[1]) < attention.sum(dim=1, keepdim=True))
    return LogpIndex(rows, ids[:, 1:][seq, pos], response, seq[response], chosen,
                     completion[:, 1:].sum(dim=1).float(), right_padded)


def sequence_logps(lm: torch.nn.Module, batch: dict[str, torch.Tensor], with_nll: bool = False,
                   layout: SharedLayout | None = None, index: LogpIndex | None = None) -> SequenceLogps:
    """The log-probs of `batch`'s responses under `lm` (a causal LM; its head frozen). With `layout` (the
    batch's shared_prompt.layout_for, on the batch's device) each pair's prompt runs once: the same values.
    `index`: logp_index(batch, with_nll, layout) on the batch's device, made before (else made here)."""
    if index is None:
        index = logp_index(batch, with_nll, layout).to(batch["input_ids"].device)
    hidden = _hidden(lm, batch, layout, index.right_padded)
    weight = lm.get_output_embeddings().weight
    if weight.device != hidden.device:  # a head kept in host memory: in for the loss
        weight = weight.to(hidden.device, non_blocking=True)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index.rows)
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
    ce = linear_cross_entropy_rows(h, weight, index.targets)
    sums = torch.zeros(len(index.counts), dtype=torch.float32, device=h.device)
    sums = sums.index_add(0, index.response_seq, -ce.index_select(0, index.response))
    n = len(index.counts) // 2
    nll = None
    if with_nll:
        nll = ce.index_select(0, index.chosen).sum() / max(1, len(index.chosen))
    return SequenceLogps(sums[:n], sums[n:], index.counts[:n], index.counts[n:], nll)


def reference_logps(lm: torch.nn.Module, batch: dict[str, torch.Tensor],
                    adapter: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    layout: SharedLayout | None = None, index: LogpIndex | None = None) -> SequenceLogps:
    """sequence_logps of the reference, without gradients: `lm` with its adapters off (the base), or with the
    frozen `adapter` weights (nn.lora.adapter_snapshot) in place of its own (base + a starting adapter)."""
    with torch.no_grad(), adapters_disabled(lm) if adapter is None else adapter_weights_swapped(lm, adapter):
        return sequence_logps(lm, batch, layout=layout, index=index)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, in the numerically careful split."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_loss(s: PreferenceSettings, policy: SequenceLogps, reference: SequenceLogps | None = None,
                    lazy: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's loss (a scalar, mean over pairs) and its metrics under TRL's names: floats, or with `lazy`
    0-dim tensors on the loss's device, for the caller to read after it has queued the backward (reading a
    GPU value waits for everything queued before it)."""
    c, r = policy.chosen, policy.rejected
    if s.objective in NEEDS_REFERENCE:
        if reference is None:
            raise ValueError(f"objective {s.objective} needs the reference log-probs")
        chosen_ratio, rejected_ratio = c - reference.chosen, r - reference.rejected
        if s.objective == "dpo":
            losses = -F.logsigmoid(s.beta * (chosen_ratio - rejected_ratio))
        else:
            n_c, n_r = policy.chosen_tokens.clamp(min=1), policy.rejected_tokens.clamp(min=1)
            delta = chosen_ratio / n_c - rejected_ratio / n_r
            losses = (delta - 1 / (2 * s.beta)) ** 2
        chosen_rewards, rejected_rewards = s.beta * chosen_ratio.detach(), s.beta * rejected_ratio.detach()
        extra: dict[str, torch.Tensor] = {}
    else:
        c_avg, r_avg = c / policy.chosen_tokens.clamp(min=1), r / policy.rejected_tokens.clamp(min=1)
        if s.objective == "orpo":
            if policy.nll is None:
                raise ValueError("objective orpo needs the chosen rows' NLL (sequence_logps(..., with_nll=True))")
            log_odds = (c_avg - r_avg) - (_log1mexp(c_avg) - _log1mexp(r_avg))
            ratio = F.logsigmoid(log_odds)
            losses = policy.nll - s.beta * ratio
            extra = {"nll_loss": policy.nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                     "log_odds_chosen": log_odds.detach().mean()}
        else:
            logits = s.beta * (c_avg - r_avg) - s.simpo_gamma
            losses = -F.logsigmoid(logits) * (1 - s.label_smoothing) - F.logsigmoid(-logits) * s.label_smoothing
            extra = {}
        chosen_rewards, rejected_rewards = s.beta * c_avg.detach(), s.beta * r_avg.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": c.detach().mean(), "logps/rejected": r.detach().mean(), **extra}
    return losses.mean(), metrics if lazy else floats(metrics)


def floats(metrics: dict) -> dict[str, float]:
    """preference_loss's lazy metrics as floats."""
    return {k: float(v) for k, v in metrics.items()}
