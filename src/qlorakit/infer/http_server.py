"""The listening socket of `qlorakit serve` and uvicorn serving the FastAPI app (app.py) on it.

`bind_server` listens at once, before the model loads, so a busy port fails in a second rather than after the
load; `attach_app` then gives the server its AdapterServer and `serve_forever` runs uvicorn on that socket until
`shutdown` (from another thread) or, with drain_on_signals, SIGTERM or Ctrl-C: all stop accepting and let the
requests in flight finish. The listen backlog (BACKLOG) holds a burst of connections (20 clients at once reset
connections with Python's old default of 5).

uvicorn's HTTP/1.1 protocol is kept with one change (_Protocol): a request h11 cannot parse is answered with the
same one-line JSON error as every other refusal, not plain text; a Content-Length that is not a number (411) or
is negative (400) is such a request, since h11 refuses it before the app sees it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ServeAddressError
from .requests import MAX_BODY_BYTES, RequestError, content_length

if TYPE_CHECKING:
    from .serve import AdapterServer

log = logging.getLogger("qlorakit.infer")

BACKLOG = 1024  # connections the kernel queues before accept
_HEAD_BYTES = 1 << 16  # of a request's head kept to name what was wrong with it
_CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*(.*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol that answers an unparsable request with a JSON error of one line."""

    _head = b""  # the bytes of the request being parsed, while h11 waits for its head

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._head += data[:_HEAD_BYTES - len(self._head)]
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._head = b""

    def send_400_response(self, msg: str) -> None:
        reason = sys.exc_info()[1]  # uvicorn calls this while handling h11's RemoteProtocolError
        error = RequestError(f"malformed HTTP request: {reason or msg}")
        found = _CONTENT_LENGTH.search(self._head)
        if found is not None:
            try:
                content_length(found.group(1).decode("latin-1"), MAX_BODY_BYTES)
            except RequestError as err:
                error = err
        body = json.dumps({"error": {"message": str(error), "type": "invalid_request_error", "code": error.code}})
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        events = (h11.Response(status_code=int(error.status), headers=headers, reason=error.status.phrase),
                  h11.Data(data=body.encode("utf-8")), h11.EndOfMessage())
        self.transport.write(b"".join(self.conn.send(event) or b"" for event in events))
        self.transport.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, with `qlorakit serve`'s signals when drain_on_signals (main thread only): SIGTERM logs a
    line, stops accepting, lets the requests in flight finish and returns (exit 0: uvicorn itself would raise the
    signal again once stopped); Ctrl-C drains the same way and then raises KeyboardInterrupt, and a second Ctrl-C
    stops waiting for the requests in flight."""

    drain_on_signals = False
    _interrupted = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if not self.drain_on_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._drain) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._interrupted:
            raise KeyboardInterrupt

    def _drain(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            if self._interrupted:
                self.force_exit = True
                return
            self._interrupted = True
        log.warning("qlorakit serve: %s: finishing the requests in flight, then stopping", signal.Signals(signum).name)
        self.should_exit = True


class HttpServer:
    """A socket listening on server_address, and uvicorn serving an AdapterServer on it once attached."""

    def __init__(self, sock: socket.socket):
        self.socket = sock
        self.server_address: tuple = sock.getsockname()
        self._uvicorn: _Uvicorn | None = None
        self._serving, self._stopped = threading.Event(), threading.Event()

    def attach(self, app: AdapterServer) -> None:
        from .app import build_app

        config = uvicorn.Config(build_app(app), http=_Protocol, backlog=BACKLOG, lifespan="off", loop="asyncio",
                                log_config=None, log_level="error", access_log=False)
        self._uvicorn = _Uvicorn(config)

    def serve_forever(self, drain_on_signals: bool = False) -> None:
        """Answer requests until shutdown() (or SIGTERM or Ctrl-C, with drain_on_signals, in the main thread)."""
        if self._uvicorn is None:
            raise RuntimeError("attach_app(server, app) first: this server has nothing to serve")
        self._uvicorn.drain_on_signals = drain_on_signals
        self._serving.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop accepting, let the requests in flight finish, and return once serve_forever has."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            if self._serving.is_set():
                self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()


def bind_server(host: str, port: int) -> HttpServer:
    """An HttpServer listening on host:port (port 0: an ephemeral port, see server.server_address) that answers
    nothing until attach_app. ServeAddressError (one line) when it cannot listen there: serve binds before it
    loads anything, so a busy port fails at once rather than after the model load."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeAddressError(f"--port {port}: allowed 0 to 65535 (0: any free port)")
    try:
        sock = socket.create_server((host, port), backlog=BACKLOG)
    except OSError as err:
        raise ServeAddressError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); choose "
                                "another --port (0: any free port) or --host") from None
    return HttpServer(sock)


def attach_app(server: HttpServer, app: AdapterServer) -> HttpServer:
    server.attach(app)
    return server


def make_server(app: AdapterServer, host: str = "127.0.0.1", port: int = 8000) -> HttpServer:
    """An HttpServer bound to host:port (port 0: an ephemeral port, see server.server_address) serving `app`."""
    return attach_app(bind_server(host, port), app)
