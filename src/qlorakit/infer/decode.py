"""Token-by-token decoding with a static KV cache, the one-token step replayed as a CUDA graph on a GPU.

Eager decoding of a 4-bit model is bound by the host, not the GPU: every token runs hundreds of small layers,
and launching their kernels from Python takes longer than running them (on the H200, transformers' eager
`generate` of the 8B shape spends ~29 ms a token in bf16 and more with 4-bit layers). Here the step (embedding,
every layer with its 4-bit GEMV and LoRA path, the head) is captured once per call into a CUDA graph and
replayed for each new token, so a token costs one graph launch plus a few small ops. The KV cache is
transformers' StaticCache (fixed shapes, updated in place), the attention mask a fixed-size 4-D tensor that the
graph itself extends by one column per token, and the positions a tensor the graph increments.

On a CPU, or when `graphs=False`, the same loop runs eagerly; the tokens are the same either way (tests compare
them with transformers' `generate`). If a graph cannot be captured (an attention implementation or a layer that
synchronises with the host), decoding continues eagerly and says why, once.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from .. import logs
from ..errors import OptionValueError, QlorakitError

log = logging.getLogger("qlorakit.infer")

MASKS = ("sdpa", "eager")  # attention implementations whose 4-D mask this module builds


def say_once(key: str, msg: str, *args) -> None:
    """Log a warning the first time `key` comes up in this process (a fast path not taken says so once)."""
    logs.say_once(log, key, msg, *args)


def capture_step(dec, key: str, doing: str, step: str) -> None:
    """Capture `dec._step_body()` as a CUDA graph into dec.graph, its output into dec.logits, after one eager
    warm-up step (compiling kernels and sizing buffers outside the capture) whose effects on keep, mask,
    positions and cursor `dec._restore` undoes. If capturing fails, dec decodes eagerly from then on (dec.graphs
    False) and the reason is said once. Shared by StaticDecoder and infer/slots.SlotDecoder."""
    saved = (dec.keep.clone(), dec.mask.clone(), dec.positions.clone(), dec.cursor.clone())
    try:
        side = torch.cuda.Stream(dec.device)
        side.wait_stream(torch.cuda.current_stream(dec.device))
        with torch.cuda.stream(side):
            dec._step_body()
        torch.cuda.current_stream(dec.device).wait_stream(side)
        dec._restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dec.logits = dec._step_body()
        dec.graph = graph
    except Exception as err:  # noqa: BLE001 - decode eagerly instead, and say why
        dec.graph, dec.logits, dec.graphs = None, None, False
        torch.cuda.synchronize(dec.device)
        dec._restore(saved)
        say_once(f"{key}-{type(err).__name__}", "qlorakit: %s without CUDA graphs (eager, host-bound): capturing "
                 "the %s step failed: %s: %s", doing, step, type(err).__name__, str(err).splitlines()[0][:300])


def _cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: `cache` in recent transformers, `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise QlorakitError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`; the static "
                        "decoder needs a transformers causal LM")


class StaticDecoder:
    """Decode `batch` rows of a causal LM for at most `max_len` positions (prompt included).

        dec = StaticDecoder(model, batch=1, max_len=prompt_len + new_tokens)
        logits = dec.prefill(input_ids, attention_mask)   # [batch, vocab], the prompt's last position
        logits = dec.step(next_ids)                        # one token per row -> the next logits

    Rows are left-padded (attention_mask 0 on the left); each row's positions start at its first real token.
    """

    @staticmethod
    def check(model: nn.Module, max_len: int = 2) -> None:
        """QlorakitError naming the reason if this decoder cannot run `model`."""
        from transformers import StaticCache

        attn = getattr(model.config, "_attn_implementation", None) or "eager"
        if attn not in MASKS:
            raise QlorakitError(f"the static decoder builds masks for attention {MASKS}, the model uses {attn!r}")
        _cache_kwarg(model)
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        if kinds != ["StaticLayer"]:
            raise QlorakitError(f"the static decoder handles full-attention cache layers (StaticLayer); this model's "
                                f"cache has {kinds or 'no layers'} (e.g. sliding-window attention)")

    def __init__(self, model: nn.Module, batch: int, max_len: int, *, graphs: bool | None = None):
        from transformers import StaticCache

        self.check(model, max_len)
        self.model = model
        self.attn = getattr(model.config, "_attn_implementation", None) or "eager"
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.batch, self.max_len = int(batch), int(max_len)
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.cache_kwarg = _cache_kwarg(model)
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise QlorakitError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
        # What the step reads and writes in place (fixed addresses, so a captured graph sees new values).
        self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.cursor = torch.zeros(1, dtype=torch.long, device=self.device)  # the cache slot the step writes
        self.keep = torch.zeros(self.batch, 1, 1, self.max_len, dtype=torch.bool, device=self.device)
        self.mask = self.keep if self.attn == "sdpa" else torch.zeros(self.keep.shape, dtype=self.dtype, device=self.device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.prompt_len = 0

    def _forward(self, **inputs) -> torch.Tensor:
        out = self.model(**inputs, **{self.cache_kwarg: self.cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _set_mask(self) -> None:
        if self.attn == "eager":
            self.mask.copy_(torch.where(self.keep, 0.0, torch.finfo(self.dtype).min).to(self.dtype))

    def _step_body(self) -> torch.Tensor:
        """One token for every row: open the cursor's column of the mask, run the model, advance."""
        self.keep.index_fill_(3, self.cursor, True)
        if self.attn == "eager":
            self.mask.index_fill_(3, self.cursor, 0.0)
        logits = self._forward(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions)
        self.cursor.add_(1)
        self.positions.add_(1)
        return logits

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt [batch, P] (left-padded) through the model, filling the cache; the last logits."""
        if input_ids.shape[0] != self.batch:
            raise QlorakitError(f"prefill: {input_ids.shape[0]} rows, the decoder was built for {self.batch}")
        p = input_ids.shape[1]
        if p >= self.max_len:
            raise QlorakitError(f"the prompt has {p} tokens, the decoder holds {self.max_len} positions in all")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.cache.reset()
        logits = self._forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
        self.prompt_len = p
        self.keep.zero_()
        self.keep[:, 0, 0, :p] = attention_mask.bool()
        self._set_mask()
        self.positions.copy_(positions[:, -1:] + 1)
        self.cursor.fill_(p)
        if self.graphs:
            self._capture()
        return logits.clone()

    def _layers_at(self, length: int) -> None:
        """Put every cache layer's fill length back to `length` (the warm-up step advanced it)."""
        for layer in getattr(self.cache, "layers", []):
            filled = getattr(layer, "cumulative_length", None)
            if isinstance(filled, torch.Tensor):
                filled.fill_(length)
            else:
                raise QlorakitError("this transformers version's StaticCache keeps no cumulative_length tensor")

    def _capture(self) -> None:
        """Capture the step as a CUDA graph (after one eager warm-up step whose effects are undone)."""
        capture_step(self, "graph", "decoding", "decode")

    def _restore(self, saved) -> None:
        keep, mask, positions, cursor = saved
        self.keep.copy_(keep)
        self.mask.copy_(mask)
        self.positions.copy_(positions)
        self.cursor.copy_(cursor)
        self._layers_at(self.prompt_len)

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [batch]; the logits [batch, vocab] for the position after it (a view that the
        next step overwrites when a graph runs: copy it to keep it)."""
        self.ids.copy_(next_ids.view(self.batch, 1))
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._step_body()


def check_repetition_penalty(penalty: object) -> float:
    """The penalty as a float; OptionValueError unless it is a finite number > 0 (1: off)."""
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 < penalty < float("inf"):
        raise OptionValueError(f"--repetition-penalty {penalty!r}: allowed a finite number > 0 (1: off)")
    return float(penalty)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty of CTRL (Keskar et al., 2019) as transformers' RepetitionPenaltyLogitsProcessor
    applies it: the logit of every token in `seen` is divided by `penalty` when positive and multiplied by it when
    negative, so a penalty > 1 makes those tokens less likely. logits [batch, vocab] (any float dtype), seen
    [batch, vocab] bool on the same device; returns new float32 logits (the input is not written)."""
    logits = logits.float()
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def choose_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or nucleus sampling over logits [batch, vocab]; token ids [batch]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens after the nucleus is complete
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


@torch.no_grad()
def decode_tokens(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                  max_new_tokens: int, eos_ids: list[int], pad_id: int, temperature: float = 0.0,
                  top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = 0,
                  graphs: bool | None = None, report: dict | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [batch] (on the CPU), up to max_new_tokens or until every row has
    produced an end-of-sequence id; rows that have finished get `pad_id`. A repetition_penalty other than 1
    (penalize_repeats) is applied, outside the CUDA graph, before the greedy or sampled choice, to the tokens this
    row has generated so far; not to its prompt, where a chat template puts the end-of-turn token (often the EOS)
    and the question's own words, which a reply should stay free to use. That is transformers'
    RepetitionPenaltyLogitsProcessor with prompt_ignore_length = the prompt's length. `report`, if given, receives
    "graph" (whether the step ran as a CUDA graph) and "prefill_s" (prompt and capture, in seconds)."""
    penalty = check_repetition_penalty(repetition_penalty)
    if max_new_tokens <= 0:
        return
    batch, p = input_ids.shape
    dec = StaticDecoder(model, batch, p + max_new_tokens, graphs=graphs)
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=dec.device).manual_seed(seed)
    t0 = time.perf_counter()
    logits = dec.prefill(input_ids, attention_mask)
    if report is not None:
        report.update(graph=dec.graph is not None, prefill_s=time.perf_counter() - t0)
    eos = torch.tensor(sorted(set(eos_ids)) or [-1])
    done = torch.zeros(batch, dtype=torch.bool, device=dec.device)  # on the device: no wait to pad finished rows
    done_host = torch.zeros(batch, dtype=torch.bool)
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=dec.device) if penalty != 1.0 else None
    for i in range(max_new_tokens):
        if seen is not None:
            logits = penalize_repeats(logits, seen, penalty)
        nxt = choose_next(logits, temperature, top_p, generator)
        if seen is not None:
            seen.scatter_(1, nxt.view(-1, 1), True)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        host = nxt.cpu()  # the one wait per token
        done_host |= torch.isin(host, eos)
        yield host
        if bool(done_host.all()) or i == max_new_tokens - 1:
            return
        done.copy_(done_host, non_blocking=True)
        logits = dec.step(nxt)
