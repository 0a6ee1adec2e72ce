"""Preference records (prompt, chosen, rejected) -> tokenised pairs, exactly as TRL's DPOTrainer tokenises them.

Two formats, one per file, as TRL has them:
  standard        prompt, chosen and rejected are non-empty strings;
  conversational  prompt is a list of {role, content} messages ending with a user message, chosen and rejected
                  are lists of the assistant's reply message(s).
Standard: the tokenizer's EOS token text is appended to each completion that does not end with it, and the
prompt and prompt + completion are tokenised with the tokenizer's special tokens (so its BOS, if it adds one).
Conversational: the prompt is rendered through the chat template with the generation prompt, prompt + reply
without it; the template closes the turn, nothing is appended.
Either way the prompt's tokens are the part the three renderings share at their start, and a completion is the
rest of its rendering (see _split).

Truncation, when the prompt and the longer completion exceed max_length: the prompt loses its start down to
max_prompt_length tokens (when given; a leading BOS is kept), then both completions lose their ends to fit. A
pair left with an empty completion (its prompt fills max_length) is dropped. Without max_prompt_length this is
TRL 1.15's truncation (keep_start, each sequence cut to max_length, pairs whose prompt fills it dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataFormatError
from .chat import ROLES
from .pair_examples import PairExamples
from .pieces import RecordError, describe, encode
from .readers import load_records

FIELDS = ("prompt", "chosen", "rejected")
_EITHER = ("a record is either standard (prompt, chosen and rejected all strings) or conversational (all lists "
           "of {role, content} messages)")


@dataclass(frozen=True)
class PairReport:
    """One file's preference pairs: records read, pairs kept, and what truncation did."""

    source: str
    fmt: str
    max_length: int
    max_prompt_length: int | None
    records: int
    pairs: int
    prompts_cut: int = 0
    """kept pairs whose prompt lost its start to max_prompt_length"""
    completions_cut: int = 0
    """kept pairs with a completion cut at its end to fit max_length"""
    dropped: int = 0
    """pairs whose prompt alone fills max_length, so a completion would be left empty"""
    longest: int = 0
    """tokens of the longest pair (prompt + longer completion) before truncation"""

    def line(self) -> str:
        """One line for the log."""
        parts = [f"{self.records} records -> {self.pairs} pairs"]
        if self.prompts_cut:
            parts.append(f"{self.prompts_cut} prompts cut to their last {self.max_prompt_length} tokens")
        if self.completions_cut:
            parts.append(f"{self.completions_cut} pairs with completions cut to fit max_length {self.max_length}")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (prompt fills max_length {self.max_length})")
        return f"{self.source} ({self.fmt} pairs): {', '.join(parts)}; longest pair {self.longest} tokens"


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """The checked preference records of a .json, .jsonl, .parquet or .csv file (see check_pairs).

    Raises DataFormatError, one line naming the file (and the record and field), for a file that cannot be read
    or a record that is not a preference pair.
    """
    return check_pairs(load_records(path), str(path))


def check_pairs(records: Sequence[Any], source: str) -> list[dict[str, Any]]:
    """Every record checked and reduced to {prompt, chosen, rejected} (messages to {role, content}); all in one
    format. Raises DataFormatError naming `source`, the record (numbered from 0) and the field."""
    if not records:
        raise DataFormatError(f"{source}: the file holds no records")
    pairs, first = [], None
    for index, record in enumerate(records):
        try:
            pair = check_pair(record)
        except RecordError as err:
            raise DataFormatError(f"{source}: record {index}: {err}") from None
        fmt = pair_format(pair)
        if first is None:
            first = fmt
        elif fmt != first:
            raise DataFormatError(f"{source}: record {index}: is {fmt} but record 0 is {first}; a file holds "
                                  f"one format ({_EITHER})")
        pairs.append(pair)
    return pairs


def pair_format(pair: dict[str, Any]) -> str:
    """'standard' or 'conversational', for a checked pair."""
    return "standard" if isinstance(pair["prompt"], str) else "conversational"


def check_pair(record: Any) -> dict[str, Any]:
    """One record checked and reduced to its three fields, or RecordError (a phrase naming the field)."""
    if not isinstance(record, dict):
        raise RecordError(f"must be a mapping with prompt, chosen and rejected, got {describe(record)}")
    for field in FIELDS:
        if record.get(field) is None:
            raise RecordError(f"{field!r} is missing (a preference record needs prompt, chosen and rejected)")
        if not isinstance(record[field], (str, list)):
            raise RecordError(f"{field!r} must be a string or a list of {{role, content}} messages, got "
                              f"{type(record[field]).__name__}")
    kinds = {field: isinstance(record[field], str) for field in FIELDS}
    if len(set(kinds.values())) > 1:
        text = next(f for f in FIELDS if kinds[f])
        listed = next(f for f in FIELDS if not kinds[f])
        raise RecordError(f"{text!r} is a string but {listed!r} is a list of messages; {_EITHER}")
    if kinds["prompt"]:
        for field in FIELDS:
            if not record[field].strip():
                raise RecordError(f"{field!r} is an empty string; prompt, chosen and rejected must hold text")
        return {field: record[field] for field in FIELDS}
    prompt = _messages(record["prompt"], "prompt")
    if prompt[-1]["role"] != "user":
        raise RecordError(f"'prompt' must end with a user message, which chosen and rejected answer; its last "
                          f"message has role {prompt[-1]['role']!r}")
    pair = {"prompt": prompt}
    for field in ("chosen", "rejected"):
        reply = _messages(record[field], field)
        for j, message in enumerate(reply):
            if message["role"] != "assistant":
                raise RecordError(f"{field!r} message {j} has role {message['role']!r}; chosen and rejected hold "
                                  "the assistant's reply messages only")
        if not any(m["content"].strip() for m in reply):
            raise RecordError(f"{field!r} is an empty reply; its messages' content must hold text")
        pair[field] = reply
    return pair


def _messages(value: list[Any], field: str) -> list[dict[str, str]]:
    if not value:
        raise RecordError(f"{field!r} is an empty list; it must hold {{role, content}} messages")
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise RecordError(f"{field!r} message {j} must be a {{role, content}} mapping, got "
                              f"{type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            raise RecordError(f"{field!r} message {j} has no {'role' if role is None else 'content'!r}")
        if role not in ROLES:
            raise RecordError(f"{field!r} message {j} has role {describe(role)}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"{field!r} message {j} content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def tokenize_pairs(records: Sequence[Any], tokenizer: Any, max_length: int, max_prompt_length: int | None = None,
                   *, source: str = "preference data") -> tuple[PairExamples, PairReport]:
    """Tokenise and truncate preference records (raw or from read_pairs); see the module docstring.

    max_length: the most tokens of prompt + completion, at least 2; max_prompt_length: None, or what a prompt is
    cut to when a pair is too long, at least 1 and below max_length. Raises DataFormatError naming `source` for a
    bad record, a tokenizer that cannot render the records, or when every pair is dropped.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length must be at least 1 and below max_length {max_length} (so completions "
                         f"keep a token), got {max_prompt_length}")
    pairs = check_pairs(records, source)
    fmt = pair_format(pairs[0])
    if fmt == "standard" and tokenizer.eos_token is None:
        raise DataFormatError(f"{source}: the tokenizer has no eos_token; standard completions end with one")
    if fmt == "conversational" and not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(f"{source}: conversational pairs are rendered through the tokenizer's chat template, "
                              "and this tokenizer has none; use a tokenizer with a chat_template, or standard pairs "
                              "(prompt, chosen and rejected as strings)")
    kept: list[tuple[list[int], list[int], list[int], int]] = []
    prompts_cut = completions_cut = dropped = longest = 0
    for index, pair in enumerate(pairs):
        try:
            prompt, chosen, rejected = _split(*_render(tokenizer, pair, fmt))
        except RecordError as err:
            raise DataFormatError(f"{source}: record {index}: {err}") from None
        longest = max(longest, len(prompt) + max(len(chosen), len(rejected)))
        cut_prompt = cut_completion = False
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            if max_prompt_length is not None and len(prompt) > max_prompt_length:
                prompt, cut_prompt = _prompt_end(prompt, max_prompt_length, tokenizer.bos_token_id), True
            room = max(max_length - len(prompt), 0)
            cut_completion = max(len(chosen), len(rejected)) > room
            chosen, rejected = chosen[:room], rejected[:room]
        if not chosen or not rejected:
            dropped += 1
            continue
        prompts_cut += cut_prompt
        completions_cut += cut_completion
        kept.append((prompt, chosen, rejected, index))
    report = PairReport(source=source, fmt=fmt, max_length=max_length, max_prompt_length=max_prompt_length,
                        records=len(pairs), pairs=len(kept), prompts_cut=prompts_cut,
                        completions_cut=completions_cut, dropped=dropped, longest=longest)
    if not kept:
        raise DataFormatError(f"{source}: no pair left: every prompt fills max_length {max_length} tokens "
                              f"({report.line()}); raise max_length or set max_prompt_length")
    return PairExamples.from_pairs(kept), report


def _render(tokenizer: Any, pair: dict[str, Any], fmt: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the prompt alone, of prompt + chosen and of prompt + rejected."""
    if fmt == "standard":
        eos = tokenizer.eos_token
        ends = [pair[f] if pair[f].endswith(eos) else pair[f] + eos for f in ("chosen", "rejected")]
        return (encode(tokenizer, pair["prompt"], special=True),
                encode(tokenizer, pair["prompt"] + ends[0], special=True),
                encode(tokenizer, pair["prompt"] + ends[1], special=True))
    return (_template(tokenizer, pair["prompt"], generation_prompt=True),
            _template(tokenizer, pair["prompt"] + pair["chosen"], generation_prompt=False),
            _template(tokenizer, pair["prompt"] + pair["rejected"], generation_prompt=False))


def _template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    from jinja2 import TemplateError  # what a template's raise_exception(...) raises

    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise RecordError(f"is refused by the tokenizer's chat template: {reason}") from None
    return list(rendered["input_ids"])


def _split(prompt: list[int], with_chosen: list[int], with_rejected: list[int]) -> tuple[list[int], ...]:
    # A tokenizer may merge the prompt's last characters with the completion's first, and a template may render a
    # prompt alone otherwise than followed by a reply; the prompt is what all three renderings share at their
    # start, as in TRL, so each sequence is exactly its rendering.
    shared = min(_common_prefix(prompt, with_chosen), _common_prefix(prompt, with_rejected))
    return prompt[:shared], with_chosen[shared:], with_rejected[shared:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prompt_end(prompt: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last `keep` tokens of the prompt; a leading BOS stays first (the model has always seen one there)."""
    if bos_id is not None and prompt[0] == bos_id and keep > 1:
        return prompt[:1] + prompt[len(prompt) - keep + 1:]
    return prompt[len(prompt) - keep:]
