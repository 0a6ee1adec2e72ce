"""`stream: true` for `qlorakit serve`: server-sent events in OpenAI's chunk format, one event per piece of text as
the decoding thread makes its tokens (AdapterServer._decode streams each row's tokens into its request's queue).

Each event is `data: {json}` and a blank line; the last is `data: [DONE]`. Chat chunks are
{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"} | {"content": ...},
"finish_reason": null | "stop" | "length"}]}; completion chunks carry {"text": ...} instead of a delta. Text is
decoded from all the tokens so far and only what is new is sent, so a character that spans tokens is sent once
complete. A client that goes away (a failed write) cancels its request: the decoding thread stops as soon as no
request of its batch is left.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any


def _event(handler: Any, payload: dict[str, Any] | str) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    handler.wfile.write(f"data: {data}\n\n".encode("utf-8"))
    handler.wfile.flush()


def stream_reply(handler: Any, job: Any, model: str, chat: bool) -> None:
    """Write `job`'s reply to `handler` (a BaseHTTPRequestHandler) as server-sent events while it is decoded."""
    tokenizer = handler.app.tokenizer
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.close_connection = True
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    def chunk(piece: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["delta"] = {"role": "assistant", "content": ""} if first else (
                {"content": piece} if piece else {})
        else:
            choice["text"] = piece or ""
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": model, "choices": [choice]}

    ids: list[int] = []
    sent = ""
    try:
        if chat:
            _event(handler, chunk(None, None, first=True))
        while (token := job.stream.get()) is not None:
            ids.append(token)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a character still incomplete: wait for its next token
                continue
            if len(text) > len(sent) and text.startswith(sent):
                _event(handler, chunk(text[len(sent):], None))
                sent = text
        job.done.wait()
        if job.error is not None:
            _event(handler, {"error": {"message": f"{type(job.error).__name__}: {job.error}",
                                       "type": "server_error", "code": "internal_error"}})
        else:
            text = job.result[0]
            if len(text) > len(sent) and text.startswith(sent):  # what the streamed pieces left out
                _event(handler, chunk(text[len(sent):], None))
            _event(handler, chunk(None, "length" if job.result[2] >= job.max_tokens else "stop"))
        _event(handler, "[DONE]")
    except (BrokenPipeError, ConnectionResetError):
        job.cancelled.set()  # the client went away: its row need not be decoded further
