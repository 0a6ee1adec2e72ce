"""The routes of `qlorakit serve` as a FastAPI app over one AdapterServer (serve.py).

GET /v1/models, GET /health, POST /v1/completions and /v1/chat/completions; a trailing slash is ignored, any
other route or method is a JSON 404. Every error body is OpenAI's {"error": {"message", "type", "code"}} with a
one-line message. The event loop never decodes: a request is tokenized in a worker thread, queued for the
decoding thread, and awaited; a client that goes away before its reply is ready cancels it (its row takes no
further decoding step), streamed (streaming.py) or not. Going away is the end of the client's side of the
connection: TCP cannot tell a client that closed its socket from one that only shut down its sending side, so
both count as gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .requests import RequestError, content_length, json_object, parse_request
from .streaming import JobStream, TokenFeed, call_in_loop, error_line

if TYPE_CHECKING:
    from .serve import AdapterServer

log = logging.getLogger("qlorakit.infer")


def error_response(status: int, message: str, code: str, kind: str = "invalid_request_error", *,
                   close: bool = False) -> JSONResponse:
    """OpenAI's error body; `close` ends the connection after it (a body that was refused unread)."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status,
                        headers={"Connection": "close"} if close else None)


class _IgnoreTrailingSlash:
    """/v1/models/ is /v1/models, as it always was here, rather than a redirect."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/":
            scope = dict(scope, path=scope["path"].rstrip("/") or "/")
        await self.app(scope, receive, send)


async def _client_left(request: Request) -> None:
    """Return once the client has gone away (its body was read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _reply_or_cancel(request: Request, job: Any, done: asyncio.Future) -> bool:
    """Wait for `job`; True when it finished, False when the client left first (the job is then cancelled)."""
    gone = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if done.done():
        return True
    job.cancelled.set()
    return False


def build_app(server: AdapterServer) -> FastAPI:
    """The FastAPI app answering for `server`."""
    app = FastAPI(title="qlorakit", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.add_middleware(_IgnoreTrailingSlash)

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code in (HTTPStatus.NOT_FOUND, HTTPStatus.METHOD_NOT_ALLOWED):
            return error_response(HTTPStatus.NOT_FOUND, f"no route {request.url.path}", "not_found")
        return error_response(exc.status_code, str(exc.detail), "invalid_request")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "qlorakit"} for m in server.model_ids]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": server.model_ids}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _answer(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _answer(server, request, chat=True)

    return app


async def _answer(server: AdapterServer, request: Request, chat: bool) -> Response:
    """One completion request: the refusals of requests.py as 4xx, anything unexpected as a one-line 500."""
    try:
        return await _complete(server, request, chat)
    except RequestError as err:
        return error_response(err.status, str(err), err.code)
    except Exception as err:  # noqa: BLE001 - the client gets one line, the log the traceback
        log.exception("qlorakit serve: %s failed", request.url.path)
        return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, error_line(err), "internal_error", "server_error")


async def _complete(server: AdapterServer, request: Request, chat: bool) -> Response:
    try:  # the length first, so that a body too big is refused before any of it is read
        content_length(request.headers.get("content-length"), server.max_body_bytes)
    except RequestError as err:
        return error_response(err.status, str(err), err.code, close=True)
    body = json_object(await request.body())
    model = body.get("model")
    if model not in server.model_ids:
        return error_response(HTTPStatus.NOT_FOUND, f"model {model!r} does not exist; served: "
                              f"{', '.join(server.model_ids)}", "model_not_found")
    req = parse_request(body, chat)
    prompt, history = req.prompt_and_history()
    max_tokens, temperature, top_p = req.sampling
    # Tokenizing a long prompt takes a while: not on the event loop.
    job = await run_in_threadpool(server._job, model, prompt, history, chat, max_tokens, temperature, top_p)
    loop = asyncio.get_running_loop()
    if req.stream:
        job.stream = TokenFeed(loop)
        server.submit(job)
        return JobStream(job, server.tokenizer, model, chat)
    done = loop.create_future()
    job.on_done = lambda: call_in_loop(loop, _resolve, done)
    server.submit(job)
    if not await _reply_or_cancel(request, job, done):
        return Response(status_code=499)  # nobody reads it: the client is gone
    if job.error is not None:
        raise job.error
    text, n_prompt, n_reply = job.result
    finish = "length" if n_reply >= max_tokens else "stop"
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return JSONResponse({
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_reply, "total_tokens": n_prompt + n_reply},
    })


def _resolve(done: asyncio.Future) -> None:
    if not done.done():
        done.set_result(None)
