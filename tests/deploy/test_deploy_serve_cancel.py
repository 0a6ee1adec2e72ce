"""`qlorakit serve` stops decoding a request whose client went away, streamed or not: the request is cancelled and
its row leaves the batch at the next decoding step, instead of decoding until max_tokens. The server's
counters (AdapterServer.stats: tokens made, requests cancelled) show it. Each decoding step is slowed to 20 ms,
so the client leaves long before the 80th token whatever this machine's speed."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
from deploy_helpers import serving, slow_decoding

from qlorakit.infer.serve import AdapterServer

PROMPT = "Count to a hundred."
MAX_TOKENS = 80


@pytest.fixture
def app(tiny_base, adapter, monkeypatch):
    slow_decoding(monkeypatch)
    return AdapterServer(str(tiny_base), {"alpha": adapter}, device="cpu", progress=False, batch_window_ms=0)


def _full_reply_tokens(app: AdapterServer) -> int:
    """How many tokens the request decodes when its client stays."""
    full = app._job("alpha", PROMPT, None, False, MAX_TOKENS, 0.0, 1.0)
    app._decode([full])
    assert full.result[2] > 40  # a long reply, uncancelled
    return full.result[2]


def _send(url: str, body: dict) -> socket.socket:
    """A connection that has sent one POST /v1/completions with `body` (and will not half-close)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return conn


def _until_cancelled(app: AdapterServer, before: int) -> None:
    deadline = time.monotonic() + 30
    while app.stats["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.stats["cancelled"] == before + 1, "the request of the client that left was not cancelled"


def _answered(url: str) -> dict:
    req = urllib.request.Request(url + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "alpha", "prompt": "Hi", "max_tokens": 2}).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def test_a_non_streamed_request_whose_client_went_away_stops_decoding(app):
    full = _full_reply_tokens(app)
    before = dict(app.stats)
    with serving(app) as url:
        conn = _send(url, {"model": "alpha", "prompt": PROMPT, "max_tokens": MAX_TOKENS})
        time.sleep(0.5)  # decoding is under way (about 20 of 80 steps)
        conn.close()
        _until_cancelled(app, before["cancelled"])
        made = app.stats["tokens"] - before["tokens"]
        assert 0 < made < full / 2  # it stopped soon after the client left
        assert _answered(url)["usage"]["completion_tokens"] <= 2  # and the server goes on answering
    assert app.stats["cancelled"] == before["cancelled"] + 1  # the request that stayed was not cancelled


def test_a_stream_whose_client_went_away_stops_decoding(app):
    full = _full_reply_tokens(app)
    before = dict(app.stats)
    with serving(app) as url:
        conn = _send(url, {"model": "alpha", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True})
        received = b""
        while b'"text": "' not in received.split(b"\r\n\r\n", 1)[-1]:  # the first piece of text
            received += conn.recv(4096)
        assert received.startswith(b"HTTP/1.1 200") and b"text/event-stream" in received
        conn.close()
        _until_cancelled(app, before["cancelled"])
        made = app.stats["tokens"] - before["tokens"]
        assert 0 < made < full / 2
        assert _answered(url)["usage"]["completion_tokens"] <= 2


def test_a_request_whose_client_left_while_it_waited_is_never_prefilled(app):
    """Cancelled before the decoding thread took it (the thread busy with another request): it is dropped, no
    prefill or step decodes it."""
    long = app.submit(app._job("alpha", PROMPT, None, False, MAX_TOKENS, 0.0, 1.0))
    time.sleep(0.1)
    waiting = app._job("alpha", "Hi", None, False, MAX_TOKENS, 0.0, 1.0)
    waiting.cancelled.set()
    app.submit(waiting)
    assert waiting.done.wait(30) and waiting.error is None and waiting.result[2] == 0
    assert long.done.wait(60) and long.result[2] > 40 and not long.cancelled.is_set()
    assert app.stats["cancelled"] == 1
