"""A static KV cache of row slots for continuous batching: each slot holds one request, with its own length.

`SlotDecoder` keeps `slots` rows of `width` cache columns. A request is prefilled into a free slot (alone or
with the other requests that arrive with it, as one left-padded batch in a cache of its own), and its keys and
values are then copied into its slot's row at columns [0, prompt length), exactly where a one-row decode of
that prompt puts them. From then on every slot takes part in one shared step of one token per slot; each slot
writes its new keys and values at its own column (`cursor`, per slot), attends only to its own columns (a
[slots, 1, 1, width] mask, per slot), and takes its own RoPE position (`positions`, per slot). A slot that
empties (its request ended or was cancelled) is free at once; the next request prefilled into it overwrites it.
So what a row computes does not depend on its neighbours' prompts or lengths (only on the batch's size, through
the kernels' blocking of the matmuls), and a continuing row is never prefilled again.

Shapes are fixed (slots x 1 token; the mask, positions, cursors, the live flags and the LoRA bank's `rows` are
written in place), so on a GPU the step is captured once as a CUDA graph after the first prefill and replayed,
as decode.StaticDecoder does; a capture that fails falls back to the eager step and says why once. A request
that needs more columns than the cache has makes a wider cache (`widened`: the state copied, the graph
captured again).

Tested on the CPU (the eager step, sdpa and eager attention) and checked on an H100 by
benchmarks/serve_slots_check.py (benchmarks/results/serve_slots_check-h100.json): with prompts joining mid-decode
and a slot reused, the captured step's logits equal the eager step's within bf16 rounding (max 1% of the largest
logit, no clear-margin token flipped) and the eager step's equal a full forward of each prompt (1.6%); the graph
step took 3.1 ms against the eager step's 11.1 ms (8 slots, 4 layers of the 8B shape).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer

from ..errors import QlorakitError
from .decode import StaticDecoder, _cache_kwarg, capture_step


class SlotLayer(StaticLayer):
    """One attention layer's keys and values [slots, kv heads, width, head dim], each slot written at its own
    column: `cursor` [slots] (long, shared by all layers and owned by the SlotDecoder)."""

    def __init__(self, max_cache_len: int, cursor: torch.Tensor):
        super().__init__(max_cache_len=max_cache_len)
        self.cursor = cursor

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the step's keys and values [slots, heads, 1, dim] at each slot's cursor; all columns back."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        at = self.cursor.view(-1, 1, 1, 1)
        self.keys.scatter_(2, at.expand(-1, key_states.shape[1], 1, key_states.shape[3]), key_states)
        self.values.scatter_(2, at.expand(-1, value_states.shape[1], 1, value_states.shape[3]), value_states)
        return self.keys, self.values


class SlotDecoder:
    """`slots` rows of a static cache `width` columns wide, filled by `prefill` and advanced by `step`. The
    state lives on the model's device: ids, positions [slots, 1] and cursor, live [slots] int64; keep [slots, 1, 1,
    width] bool (the mask itself for sdpa; eager attention gets `mask`, the same in the model's dtype, 0 or min).

        dec = SlotDecoder(model, slots=4, width=256)
        logits = dec.prefill([2, 0], [prompt_a, prompt_b])  # [2, vocab]: the prompts' last positions
        logits = dec.step(next_ids)                           # [slots] ids -> [slots, vocab]
        dec.release(2)                                        # slot 2 is free again

    A free slot still runs in the step (fixed shapes) but neither advances nor is read by any other row; its
    logits are to be ignored.
    """

    def __init__(self, model: nn.Module, slots: int, width: int, *, graphs: bool | None = None):
        StaticDecoder.check(model, width)
        self.model = model
        self.attn = getattr(model.config, "_attn_implementation", None) or "eager"
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.slots, self.width = int(slots), int(width)
        self.cache_kwarg = _cache_kwarg(model)
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise QlorakitError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
        s, dev = self.slots, self.device
        # What the step reads and writes in place (fixed addresses, so a captured graph sees new values).
        self.ids = torch.zeros(s, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(s, 1, dtype=torch.long, device=dev)  # each slot's next RoPE position
        self.cursor = torch.zeros(s, dtype=torch.long, device=dev)  # the column each slot's next token goes to
        self.live = torch.zeros(s, dtype=torch.long, device=dev)  # 1: the slot holds a request (it advances)
        self.keep = torch.zeros(s, 1, 1, self.width, dtype=torch.bool, device=dev)
        self.mask = self.keep if self.attn == "sdpa" else torch.zeros(self.keep.shape, dtype=self.dtype, device=dev)
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = Cache(layers=[SlotLayer(self.width, self.cursor) for _ in range(layers)])
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _forward(self, cache, **inputs) -> torch.Tensor:
        out = self.model(**inputs, **{self.cache_kwarg: cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _set_mask(self) -> None:
        if self.attn == "eager":
            self.mask.copy_(torch.where(self.keep, 0.0, torch.finfo(self.dtype).min).to(self.dtype))

    def _step_body(self) -> torch.Tensor:
        """One token for every slot: open each slot's cursor column, run the model, advance the live slots."""
        at = self.cursor.view(-1, 1, 1, 1)
        self.keep.scatter_(3, at, True)
        if self.attn == "eager":
            self.mask.scatter_(3, at, 0.0)
        logits = self._forward(self.cache, input_ids=self.ids, attention_mask=self.mask,
                               position_ids=self.positions)
        self.cursor.add_(self.live)
        self.positions.add_(self.live.view(-1, 1))
        return logits

    @torch.no_grad()
    def prefill(self, slots: list[int], rows: list[list[int]]) -> torch.Tensor:
        """Prefill prompts `rows` (token ids) into the free `slots` (one each), as one left-padded batch in a cache
        of its own whose keys and values are then copied into the slots. Returns the prompts' last logits
        [len(rows), vocab] (the model's dtype, on its device). The LoRA bank's rows must name these prompts'
        adapters, in this order, while it runs."""
        if len(slots) != len(rows) or not rows:
            raise QlorakitError(f"prefill: {len(rows)} prompts for {len(slots)} slots")
        longest = max(len(r) for r in rows)
        if any(len(r) >= self.width for r in rows):
            raise QlorakitError(f"a prompt of {longest} tokens; this cache holds {self.width} positions per slot")
        ids = torch.zeros((len(rows), longest), dtype=torch.long)  # left padding: id 0, masked out
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, longest - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, longest - len(r):] = 1
        alone = StaticDecoder(self.model, len(rows), longest + 1, graphs=False)
        logits = alone.prefill(ids, mask)
        for layer, theirs in zip(self.cache.layers, alone.cache.layers):
            if not layer.is_initialized:
                k, v = theirs.keys, theirs.values
                layer.lazy_initialization(k.new_empty(self.slots, k.shape[1], 1, k.shape[3]),
                                          v.new_empty(self.slots, v.shape[1], 1, v.shape[3]))
            for i, (slot, r) in enumerate(zip(slots, rows)):
                n = len(r)  # row i's prompt sits at columns [longest - n, longest) there, at [0, n) here
                layer.keys[slot, :, :n].copy_(theirs.keys[i, :, longest - n:longest])
                layer.values[slot, :, :n].copy_(theirs.values[i, :, longest - n:longest])
        for slot, r in zip(slots, rows):
            self.keep[slot].zero_()
            self.keep[slot, 0, 0, :len(r)] = True
            self.positions[slot] = len(r)
            self.cursor[slot] = len(r)
            self.live[slot] = 1
        self._set_mask()
        if self.graphs and self.graph is None:
            self._capture()
        return logits

    def release(self, slot: int) -> None:
        """Free `slot` now: it stops advancing, and nothing of its request is read again."""
        self.live[slot] = 0
        self.cursor[slot] = 0
        self.positions[slot] = 0
        self.keep[slot].zero_()
        if self.attn == "eager":
            self.mask[slot].fill_(torch.finfo(self.dtype).min)

    def _capture(self) -> None:
        """Capture the step as a CUDA graph after one eager warm-up step, whose effects are undone (the keys and
        values it wrote sit at each slot's cursor column, which the next real step writes again first)."""
        capture_step(self, "slot-graph", "serving", "slot")

    def _restore(self, saved) -> None:
        for mine, old in zip((self.keep, self.mask, self.positions, self.cursor), saved):
            mine.copy_(old)

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per slot [slots] (anything for free slots); the logits [slots, vocab] for each slot's
        next position (a view that the next step overwrites when a graph runs: use it before stepping again)."""
        self.ids.copy_(next_ids.view(self.slots, 1))
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._step_body()

    @torch.no_grad()
    def widened(self, width: int) -> SlotDecoder:
        """A decoder of `width` columns holding this one's slots as they are (the step captured again)."""
        wide = SlotDecoder(self.model, self.slots, width, graphs=self.graphs)
        for mine, theirs in zip(wide.cache.layers, self.cache.layers):
            if theirs.is_initialized:
                k, v = theirs.keys, theirs.values
                mine.lazy_initialization(k[:, :, :1], v[:, :, :1])
                mine.keys[:, :, :self.width].copy_(k)
                mine.values[:, :, :self.width].copy_(v)
        wide.keep[..., :self.width].copy_(self.keep)
        wide._set_mask()
        for mine, theirs in ((wide.positions, self.positions), (wide.cursor, self.cursor), (wide.live, self.live)):
            mine.copy_(theirs)
        if wide.graphs and any(layer.is_initialized for layer in wide.cache.layers):
            wide._capture()
        return wide


def greedy_joins(dec: SlotDecoder, prompts: list[list[int]], joins: dict[int, list[tuple[int, int]]],
                 new: int, forced: dict[int, list[int]] | None = None,
                 record: dict[int, list[torch.Tensor]] | None = None) -> dict[int, list[int]]:
    """Replay an arrival schedule on `dec`, greedily: before step s the (prompt index, slot) pairs of joins[s]
    are prefilled together; each row leaves its slot after `new` tokens. Each prompt's tokens (by index). What the
    tests and benchmarks/serve_slots_check.py compare with each prompt decoded alone. `forced`: feed these tokens
    (by prompt) instead of the argmax (teacher forcing, so two decoders see the same inputs); `record`: gets each
    prompt's logits rows (fp32, on the CPU) in order, the prefill's first."""
    got: dict[int, list[int]] = {}
    where: dict[int, int] = {}  # slot -> prompt index

    def take(p: int, row: torch.Tensor) -> int:
        if record is not None:
            record.setdefault(p, []).append(row.float().cpu())
        chosen = int(row.argmax())
        return chosen if forced is None else forced[p][len(got.get(p, []))]

    nxt = torch.zeros(dec.slots, dtype=torch.long, device=dec.device)
    for s in range(max(joins) + new + 1):
        if s in joins:
            first = dec.prefill([slot for _, slot in joins[s]], [prompts[p] for p, _ in joins[s]])
            for (p, slot), row in zip(joins[s], first):
                t = take(p, row)
                got[p], where[slot] = [t], p
                nxt[slot] = t
        if not where:
            continue
        logits = dec.step(nxt)
        for slot, p in list(where.items()):
            got[p].append(take(p, logits[slot]))
            nxt[slot] = got[p][-1]
            if len(got[p]) == new:
                dec.release(slot)
                del where[slot]
    return got
