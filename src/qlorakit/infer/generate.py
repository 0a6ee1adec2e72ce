"""Text generation on the 4-bit base (plus adapter): prompts rendered with the chat template when there is one,
tokens streamed as they come, stopping at EOS."""

from __future__ import annotations

from collections.abc import Iterator
import logging
from threading import Thread
from typing import TextIO

import torch
from torch import nn

from ..errors import QlorakitError

log = logging.getLogger("qlorakit.infer")


def render_prompt(tokenizer, prompt: str, *, use_chat_template: bool = True,
                  history: list[dict[str, str]] | None = None) -> str:
    """The text the model sees: a chat-formatted user turn with a generation prompt, or the raw prompt."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = list(history or []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, *, stream: TextIO | None = None, **options) -> str:
    """Generate a reply to `prompt` (options as for stream_generate; greedy when temperature == 0, no repetition
    penalty unless repetition_penalty != 1), writing the text to `stream` as it comes if given."""
    pieces = []
    for piece in stream_generate(model, tokenizer, prompt, **options):
        pieces.append(piece)
        if stream is not None:
            stream.write(piece)
            stream.flush()
    return "".join(pieces)


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    use_chat_template: bool = True,
    history: list[dict[str, str]] | None = None,
    seed: int | None = 0,
) -> Iterator[str]:
    """Yield decoded text pieces as they are generated: greedy when temperature == 0, else sampling with
    `temperature` and nucleus `top_p`. repetition_penalty > 1 makes the tokens the reply already holds less likely
    (transformers' repetition penalty over the reply, not the prompt: decode.decode_tokens says why); 1 leaves the
    logits alone. Decodes
    through qlorakit's static-cache decoder (CUDA graphs on a GPU, `decode.py`); a model that decoder cannot take
    goes through transformers' `generate` with the same options, and the log says so."""
    from .decode import StaticDecoder, check_repetition_penalty, decode_tokens, say_once

    repetition_penalty = check_repetition_penalty(repetition_penalty)

    text = render_prompt(tokenizer, prompt, use_chat_template=use_chat_template, history=history)
    device = next(model.parameters()).device
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not use_chat_template or not tokenizer.chat_template)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    was_training = model.training
    model.eval()
    try:
        try:
            StaticDecoder.check(model)
        except QlorakitError as why:
            say_once("hf-generate", "qlorakit: decoding through transformers' generate (eager): %s", why)
            yield from _hf_stream(model, tokenizer, enc, device, eos, pad, max_new_tokens, temperature, top_p,
                                  repetition_penalty, seed)
            return
        ids: list[int] = []
        shown = ""
        for tok in decode_tokens(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                                 eos_ids=eos, pad_id=pad, temperature=temperature, top_p=top_p,
                                 repetition_penalty=repetition_penalty, seed=seed):
            t = int(tok[0])
            if t in eos:
                break
            ids.append(t)
            now = tokenizer.decode(ids, skip_special_tokens=True)
            if now.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                continue
            if now.startswith(shown):
                yield now[len(shown):]
                shown = now
        rest = tokenizer.decode(ids, skip_special_tokens=True)
        if rest.startswith(shown) and len(rest) > len(shown):
            yield rest[len(shown):]
    finally:
        model.train(was_training)


def _hf_stream(model, tokenizer, enc, device, eos, pad, max_new_tokens, temperature, top_p, repetition_penalty,
               seed) -> Iterator[str]:
    """transformers' generate in a thread, its text streamed back; the repetition penalty counts the reply only,
    as decode_tokens does."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                  max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, streamer=streamer,
                  do_sample=temperature > 0, repetition_penalty=1.0)  # not the model's generation_config's
    if repetition_penalty != 1.0:
        prompt_len = enc["input_ids"].shape[1]
        kwargs.update(logits_processor=LogitsProcessorList(
            [RepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_ignore_length=prompt_len)]))
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
        if seed is not None:
            torch.manual_seed(seed)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            model.generate(**kwargs)
        except BaseException as err:  # surfaced in the caller's thread below
            errors.append(err)
            streamer.end()

    worker = Thread(target=run, daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        worker.join()
    if errors:
        raise errors[0]


def prompt_ids(tokenizer, prompt: str, *, use_chat_template: bool = True,
               history: list[dict[str, str]] | None = None) -> list[int]:
    """The token ids the model sees for `prompt` (rendered as stream_generate renders it)."""
    text = render_prompt(tokenizer, prompt, use_chat_template=use_chat_template, history=history)
    special = not use_chat_template or not getattr(tokenizer, "chat_template", None)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@torch.no_grad()
def decode_rows(model: nn.Module, tokenizer, rows: list[list[int]], max_new_tokens: list[int], *,
                temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                seed: int | None = 0, on_step=None) -> list[list[int]]:
    """Decode several prompts (token ids) together in one left-padded batch with the static decoder; each row
    stops at its own end-of-sequence token or its own max_new_tokens. Returns each row's new ids (EOS dropped).
    Greedy rows do not depend on the others (a repetition penalty counts only the row's own reply); sampled ones
    draw from one generator for the whole batch. `on_step(i, tokens)`, when given, sees each step's tokens (one
    per row, on the CPU) as they are made (streaming); when it returns False, decoding stops there."""
    from .decode import decode_tokens

    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: the decoder's rows end together
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    was_training = model.training
    model.eval()
    try:
        steps = []
        for tok in decode_tokens(model, ids, mask, max_new_tokens=max(max_new_tokens), eos_ids=eos, pad_id=pad,
                                 temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                                 seed=seed):
            steps.append(tok)
            if on_step is not None and on_step(len(steps) - 1, tok) is False:
                break
    finally:
        model.train(was_training)
    out = []
    for row, limit in enumerate(max_new_tokens):
        new = []
        for tok in steps[:limit]:
            t = int(tok[row])
            if t in eos:
                break
            new.append(t)
        out.append(new)
    return out


def generate_batch(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                   use_chat_template: bool = True, seed: int | None = 0) -> list[str]:
    """Replies to several prompts decoded together in one batch (decode_rows)."""
    rows = [prompt_ids(tokenizer, p, use_chat_template=use_chat_template) for p in prompts]
    new = decode_rows(model, tokenizer, rows, [max_new_tokens] * len(rows), temperature=temperature, top_p=top_p,
                      repetition_penalty=repetition_penalty, seed=seed)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
