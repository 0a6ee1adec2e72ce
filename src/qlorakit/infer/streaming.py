"""`stream: true` for `qlorakit serve`: server-sent events in OpenAI's chunk format, one event per piece of text as
the decoding thread makes its tokens (batcher.Batcher puts each row's tokens into its request's TokenFeed).

Each event is `data: {json}` and a blank line; the last is `data: [DONE]`. Chat chunks are
{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"} | {"content": ...},
"finish_reason": null | "stop" | "length"}]}; completion chunks carry {"text": ...} instead of a delta. Text is
decoded from all the tokens so far and only what is new is sent, so a character that spans tokens is sent once
complete. A client that goes away cancels its request (JobStream): its row leaves the running batch before the
next decoding step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def call_in_loop(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """Run fn(*args) on `loop` from another thread; nothing when the loop has already stopped (no one waits)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


class TokenFeed:
    """A job's `stream`: the decoding thread calls put(token id) and finally put(None); the web layer's event loop
    awaits get()."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._queue = loop, asyncio.Queue()

    def put(self, token: int | None) -> None:
        call_in_loop(self._loop, self._queue.put_nowait, token)

    async def get(self) -> int | None:
        return await self._queue.get()


def error_line(err: BaseException) -> str:
    """`Type: first line` of an error the server did not expect (the log has the traceback)."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}".removesuffix(": ")


def _event(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def sse_events(job: Any, tokenizer: Any, model: str, chat: bool) -> AsyncIterator[str]:
    """The server-sent events of `job` (queued with a TokenFeed as its stream) while it is decoded."""
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
    if chat:
        yield _event(chunk(None, None, first=True))
    while (token := await job.stream.get()) is not None:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character still incomplete: wait for its next token
            continue
        if len(text) > len(sent) and text.startswith(sent):
            yield _event(chunk(text[len(sent):], None))
            sent = text
    # The feed ends after the decoding thread set done, error and result.
    if job.error is not None:
        yield _event({"error": {"message": error_line(job.error), "type": "server_error", "code": "internal_error"}})
    else:
        text = job.result[0]
        if len(text) > len(sent) and text.startswith(sent):  # what the streamed pieces left out
            yield _event(chunk(text[len(sent):], None))
        yield _event(chunk(None, "length" if job.result[2] >= job.max_tokens else "stop"))
    yield _event("[DONE]")


class JobStream(StreamingResponse):
    """The server-sent events of a queued job. Whatever ends the response before the job is done (the client
    went away, even before the first event; an error) cancels the job."""

    def __init__(self, job: Any, tokenizer: Any, model: str, chat: bool):
        super().__init__(sse_events(job, tokenizer, model, chat), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.done.is_set():
                self.job.cancelled.set()
