"""`qlorakit pairs`: preference pairs from an SFT data file and a model, as the SPIN recipe makes them: the chosen
reply is the data's own answer, the rejected one the model's sampled reply to the same prompt. So the bundled
model and data make the whole SFT -> DPO pipeline without a hub: train on the seed tasks, sample from that
adapter, prefer the references to its own replies (examples/dpo.yaml).

The pairs are written in TRL's conversational preference format (prompt: the messages before the answer; chosen,
rejected: one assistant message each), one JSON object per line, to a temporary name renamed into place. A pair
whose sampled reply equals the answer (after stripping) is left out and counted.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..atomic import write_text
from ..data.chat import chat_messages, render_chat
from ..data.pieces import RecordError
from ..errors import DataFormatError
from ..options import PairsOptions

log = logging.getLogger("qlorakit.infer")


def sft_prompts(records: list[dict[str, Any]], fmt: str, messages_field: str,
                source: str) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, reference answer) of each SFT record: alpaca's instruction (+ input) and output, or a
    chat record's messages before its last assistant message and that message. Records with an empty answer are
    skipped; a malformed one is refused in one line naming the file and record."""
    out = []
    for i, record in enumerate(records):
        try:
            if fmt == "alpaca":
                instruction, extra, answer = (record.get(k) for k in ("instruction", "input", "output"))
                if not isinstance(instruction, str) or not isinstance(answer, str):
                    raise RecordError("the alpaca format needs 'instruction' and 'output' strings")
                user = instruction + ("\n\n" + extra if isinstance(extra, str) and extra.strip() else "")
                prompt = [{"role": "user", "content": user}]
            else:
                messages = chat_messages(record, messages_field)
                last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
                prompt, answer = messages[:last], messages[last]["content"]
        except RecordError as err:
            raise DataFormatError(f"{source}: record {i}: {err}") from None
        if answer.strip():
            out.append((prompt, answer))
    return out


def sample_replies(model, tokenizer, prompts: list[list[dict[str, str]]], opts: PairsOptions,
                   progress: bool = True) -> list[str]:
    """The model's sampled reply to each prompt (chat template, generation prompt), in batches."""
    from .generate import decode_rows

    replies: list[str] = []
    batches = range(0, len(prompts), opts.batch_size)
    for start in tqdm(batches, desc="sampling rejected replies", unit="batch", disable=not progress):
        rows = [render_chat(tokenizer, p, generation_prompt=True) for p in prompts[start:start + opts.batch_size]]
        new = decode_rows(model, tokenizer, rows, [opts.max_new_tokens] * len(rows),
                          temperature=opts.temperature, top_p=opts.top_p, repetition_penalty=opts.repetition_penalty,
                          seed=opts.seed + start)
        replies += [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    return replies


def pairs_command(opts: PairsOptions, progress: bool = True) -> int:
    from ..data.readers import load_records, resolve_data_path
    from .session import load_for_inference

    path = resolve_data_path(opts.data)
    items = sft_prompts(load_records(path), opts.format, opts.messages_field, str(path))[:opts.max_pairs]
    if not items:
        raise DataFormatError(f"{path}: no record with a non-empty answer to make a pair from")
    net, tok = load_for_inference(opts.model, opts.adapter, force=opts.force, device=opts.device,
                                  quantize=opts.quantize, progress=progress)
    if not getattr(tok, "chat_template", None):
        raise DataFormatError(f"{opts.model}: the tokenizer has no chat template; qlorakit pairs writes "
                              "conversational pairs and samples through the template")
    replies = sample_replies(net, tok, [p for p, _ in items], opts, progress)
    lines, same = [], 0
    for (prompt, answer), reply in zip(items, replies):
        if reply.strip() == answer.strip():
            same += 1
            continue
        lines.append(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                                 "rejected": [{"role": "assistant", "content": reply}]}, ensure_ascii=False))
    out = Path(opts.out)
    write_text(out, "".join(line + "\n" for line in lines))
    print(f"pairs: {len(lines)} written to {out} ({len(items)} prompts from {path}; {same} left out, the sampled "
          f"reply equal to the answer)", file=sys.stderr)
    return 0
