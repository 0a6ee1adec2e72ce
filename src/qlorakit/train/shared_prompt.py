"""A preference batch with each pair's prompt run once: one row per pair, [prompt | chosen | rejected].

TRL's layout (data/pair_examples.PairExamples.collate) runs every prompt twice, once before the chosen response
and once before the rejected one. Under causal attention a prompt token never sees a response, so both copies
compute the same hidden states; running the prompt once and letting both responses attend to it gives the same
log-probs and, since the two branches' gradients meet in the one prompt, the same LoRA gradients, for fewer
tokens (pairs of 2 x 1024 tokens with a 256-token prompt: 1,792 tokens instead of 2,048).

The shared row of pair i is prompt (P tokens), chosen (C), rejected (R), right-padded to the batch's longest
(L). Positions run 0..P+C-1, then P..P+R-1 again for the rejected tokens, and an additive mask [N, 1, L, L] lets
a query see a key when key <= query and the key is not padding, except that rejected tokens never see chosen
ones (each response sees the prompt and itself, as in its own row). A padding query sees itself only (no row
is all-masked). `col` maps every position of TRL's [2N, T] layout to its column in the pair's shared row, so
the log-prob bookkeeping stays that of the classic layout (train/preference.sequence_logps). The fused attention
(model/fused_blocks.py, sdpa) does not read the mask: it gathers the shared rows' queries, keys and values back
into TRL's layout, runs causal attention there and writes the outputs back (model/shared_attention.py), so the
attention costs what it costs in TRL's layout while every linear runs on the fewer shared tokens. The mask
serves every other attention path (eager, or a layer that is not fused).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..logs import say_once
from ..model.shared_attention import RowMap

log = logging.getLogger("qlorakit.train")

# The mask holds N x L x L entries of the compute dtype; past this many bytes a batch runs in TRL's layout.
MASK_LIMIT_BYTES = 128 * 2**20
ATTENTION_WITH_MASKS = ("sdpa", "eager")  # implementations that take a 4-D additive mask as it is
PADDING, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3


@dataclass(frozen=True)
class SharedLayout:
    """input_ids, position_ids, segments (PADDING/PROMPT/CHOSEN/REJECTED) [N, L]; col [2N, T]: the shared column
    of each position of TRL's layout (0 on its padding)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    col: torch.Tensor
    rows: RowMap  # the same map for the fused attention (model/shared_attention.py)

    @property
    def pairs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> SharedLayout:
        return SharedLayout(*(t.to(device, non_blocking=True) for t in
                              (self.input_ids, self.position_ids, self.segments, self.col)), self.rows.to(device))

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive attention mask [N, 1, L, L] of `dtype`: 0 where a query may see a key, the minimum
        elsewhere."""
        seg = self.segments
        n = seg.shape[1]
        query, key = seg[:, :, None], seg[:, None, :]
        causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
        allowed = causal & (query != PADDING) & (key != PADDING) & ~((query == REJECTED) & (key == CHOSEN))
        allowed |= torch.eye(n, dtype=torch.bool, device=seg.device) & (query == PADDING)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def shared_layout(batch: dict[str, torch.Tensor], pad_id: int = 0) -> SharedLayout | None:
    """The shared layout of a batch in TRL's layout (input_ids, attention_mask, completion_mask [2N, T], chosen
    rows first, right-padded; CPU tensors), or None when it would not save a token (no pair has a prompt of two
    tokens or more). A pair whose two rows start with different prompts is an error: the rows are not one pair."""
    ids, attention, completion = (batch[k].cpu() for k in ("input_ids", "attention_mask", "completion_mask"))
    n = ids.shape[0] // 2
    if n == 0 or ids.shape[0] != 2 * n:
        return None
    lengths = attention.sum(dim=1)
    # the prompt ends where the completion starts (a row without completion tokens: all of it is prompt)
    starts = torch.where(completion.any(dim=1), completion.argmax(dim=1), lengths)
    column = torch.arange(ids.shape[1])
    if not (torch.equal(attention.bool(), column < lengths[:, None])
            and torch.equal(completion.bool(), (column >= starts[:, None]) & (column < lengths[:, None]))):
        say_once(log, "shared-prompt-layout", "qlorakit: a preference batch runs its prompts twice: its rows are "
                 "not each prompt, then one response, then right padding")
        return None
    prompt = starts[:n]
    if not torch.equal(prompt, starts[n:]):
        raise ValueError("a preference batch's chosen and rejected rows hold prompts of different lengths")
    if int(prompt.max()) < 2:
        return None
    chosen, rejected = lengths[:n] - prompt, lengths[n:] - prompt
    width = int((prompt + chosen + rejected).max())
    shared = torch.full((n, width), pad_id, dtype=ids.dtype)
    positions = torch.zeros((n, width), dtype=torch.long)
    segments = torch.zeros((n, width), dtype=torch.int8)
    col = torch.zeros_like(ids, dtype=torch.long)
    for i in range(n):
        p, c, r = int(prompt[i]), int(chosen[i]), int(rejected[i])
        if not torch.equal(ids[i, :p], ids[n + i, :p]):
            raise ValueError(f"pair {i} of a preference batch: its chosen and rejected rows start with different "
                             "prompts")
        shared[i, :p + c] = ids[i, :p + c]
        shared[i, p + c:p + c + r] = ids[n + i, p:p + r]
        positions[i, :p + c] = torch.arange(p + c)
        positions[i, p + c:p + c + r] = torch.arange(p, p + r)
        segments[i, :p], segments[i, p:p + c], segments[i, p + c:p + c + r] = PROMPT, CHOSEN, REJECTED
        col[i, :p + c] = torch.arange(p + c)
        col[n + i, :p] = torch.arange(p)
        col[n + i, p:p + r] = torch.arange(p + c, p + c + r)
    rows = torch.arange(2 * n)
    gather = ((rows % n)[:, None] * width + col).flatten()
    real = attention.bool().clone()
    real[n:] &= completion[n:].bool()  # a rejected row's prompt outputs come from its chosen row
    src = (rows[:, None] * ids.shape[1] + torch.arange(ids.shape[1])).flatten()[real.flatten()]
    dst = gather[real.flatten()]
    return SharedLayout(shared, positions, segments, col, RowMap(gather, src, dst, 2 * n, int(ids.shape[1])))


def layout_for(lm: torch.nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype,
               pad_id: int = 0) -> SharedLayout | None:
    """shared_layout(batch) where `lm` can run it: its attention takes a 4-D mask and the mask fits
    MASK_LIMIT_BYTES; else None (TRL's layout), and the reason is said once."""
    impl = getattr(lm.config, "_attn_implementation", None) or "eager"
    if impl not in ATTENTION_WITH_MASKS:
        say_once(log, f"shared-prompt-{impl}", "qlorakit: preference pairs run their prompts twice (TRL's layout): "
                 f"attention {impl!r} takes no 4-D mask; {' or '.join(ATTENTION_WITH_MASKS)} would share them")
        return None
    layout = shared_layout(batch, pad_id)
    if layout is None:
        return None
    size = layout.pairs * layout.input_ids.shape[1] ** 2 * torch.finfo(dtype).bits // 8
    if size > MASK_LIMIT_BYTES:
        say_once(log, "shared-prompt-size", "qlorakit: a preference batch runs its prompts twice (TRL's layout): "
                 f"the shared-prompt mask would take {size / 2**20:.0f} MiB ({layout.pairs} pairs of "
                 f"{layout.input_ids.shape[1]} tokens), over the {MASK_LIMIT_BYTES // 2**20} MiB limit")
        return None
    return layout
