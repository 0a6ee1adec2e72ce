"""`qlorakit serve` refuses what it cannot do at once and in one line: a port in use or out of range and a
device the machine lacks, before any model is loaded; a request asking for fewer than one token (or a negative or
non-finite temperature, or top_p outside (0, 1]) is a 400 naming the field, not a 16-token reply."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
import torch

from cli_helpers import one_error_line
from qlorakit import cli
from qlorakit.errors import ServeAddressError
from qlorakit.infer.serve import AdapterServer, bind_server, make_server


@pytest.fixture
def no_base_load(monkeypatch):
    from qlorakit.model import loader

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the address and device were checked")

    monkeypatch.setattr(loader, "load_model", refuse)


def missing_device() -> str:
    """A CUDA device this machine does not have."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def test_port_in_use_fails_before_the_model_loads(tiny_base, capsys, no_base_load):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", str(tiny_base), "--port", str(port), "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert f"--port {port}: cannot listen there" in line and "in use" in line


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_port_out_of_range_is_one_line(tiny_base, capsys, no_base_load, port):
    assert cli.main(["serve", "--model", str(tiny_base), "--port", port, "--device", "cpu"]) == 2
    assert f"--port {port}: allowed 0 to 65535" in one_error_line(capsys)


def test_bind_server_refuses_a_port_already_bound():
    server = bind_server("127.0.0.1", 0)
    try:
        with pytest.raises(ServeAddressError, match="cannot listen there"):
            bind_server("127.0.0.1", server.server_address[1])
    finally:
        server.server_close()


def test_missing_device_fails_before_the_model_loads(tiny_base, capsys, no_base_load):
    device = missing_device()
    assert cli.main(["serve", "--model", str(tiny_base), "--port", "0", "--device", device]) == 2
    line = one_error_line(capsys)
    assert f"--device {device}: not available" in line and "available here: cpu" in line


@pytest.fixture(scope="module")
def url(tiny_base, adapter):
    app = AdapterServer(str(tiny_base), {"alpha": adapter}, device="cpu", progress=False)
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/completions"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


BAD_FIELDS = [
    ({"max_tokens": 0}, "max_tokens 0: allowed an integer >= 1"),
    ({"max_tokens": -3}, "max_tokens -3: allowed an integer >= 1"),
    ({"max_completion_tokens": 0}, "max_completion_tokens 0: allowed an integer >= 1"),
    ({"max_tokens": 2.5}, "max_tokens 2.5: allowed an integer >= 1"),
    ({"max_tokens": "4"}, "max_tokens '4': allowed an integer >= 1"),
    ({"temperature": -1}, "temperature -1: allowed a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature nan: allowed a finite number >= 0"),
    ({"top_p": 0}, "top_p 0: allowed a number > 0 and <= 1"),
    ({"top_p": 1.5}, "top_p 1.5: allowed a number > 0 and <= 1"),
    ({"top_p": True}, "top_p True: allowed a number > 0 and <= 1"),
    ({"stream": "maybe"}, "stream 'maybe': allowed true or false"),
    ({"prompt": ["hi", "yo"]}, "'prompt' must be a string (one prompt per request)"),
]


@pytest.mark.parametrize("fields,words", BAD_FIELDS, ids=[json.dumps(f) for f, _ in BAD_FIELDS])
def test_out_of_range_request_fields_are_400s(url, fields, words):
    status, body = _post(url, {"model": "alpha", "prompt": "hi", **fields})
    assert status == 400 and body["error"]["code"] == "invalid_request"
    assert words in body["error"]["message"] and "\n" not in body["error"]["message"]


def test_max_tokens_1_gives_one_token_and_null_fields_take_defaults(url):
    status, body = _post(url, {"model": "alpha", "prompt": "hi", "max_tokens": 1, "temperature": None,
                               "top_p": None})
    assert status == 200 and body["usage"]["completion_tokens"] <= 1


def test_a_list_of_one_prompt_is_that_prompt_and_max_tokens_wins_over_max_completion_tokens(url):
    status, listed = _post(url, {"model": "alpha", "prompt": ["hi"], "max_tokens": 2, "max_completion_tokens": 0})
    assert status == 200
    status, plain = _post(url, {"model": "alpha", "prompt": "hi", "max_tokens": 2})
    assert status == 200 and listed["choices"][0]["text"] == plain["choices"][0]["text"]
    status, body = _post(url, {"model": "alpha", "prompt": "hi", "max_completion_tokens": 1})
    assert status == 200 and body["usage"]["completion_tokens"] <= 1


def _raw(url: str, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send a hand-made HTTP request (for headers urllib will not send) and read the status and JSON reply."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as conn:
        conn.sendall(f"POST {parts.path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body)
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def _chat(url: str, body: dict) -> tuple[int, dict]:
    return _post(url.replace("/v1/completions", "/v1/chat/completions"), body)


@pytest.mark.parametrize("messages,words", [
    (["hi"], "messages[0] is a str; each message is an object"),
    ([{"role": "user"}], "messages[0].content must be a string"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role 'robot': allowed system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "must end with a user message"),
    ([], "'messages' must be a non-empty list"),
], ids=["strings", "no-content", "bad-role", "ends-with-assistant", "empty"])
def test_malformed_chat_messages_are_400s(url, messages, words):
    status, body = _chat(url, {"model": "alpha", "messages": messages})
    assert status == 400 and words in body["error"]["message"] and "\n" not in body["error"]["message"]


def test_max_tokens_and_prompts_beyond_the_context_are_400s_at_once(url):
    import time

    t0 = time.perf_counter()
    status, body = _post(url, {"model": "alpha", "prompt": "hi", "max_tokens": 10**9})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "max_tokens 1000000000: the prompt (" in body["error"]["message"] and "128-token context" in \
        body["error"]["message"]
    status, body = _post(url, {"model": "alpha", "prompt": "hi " * 20000})  # far beyond 128 tokens
    assert status == 400 and "the model's context is 128 tokens" in body["error"]["message"]
    assert time.perf_counter() - t0 < 10  # refused before anything is decoded


def test_bad_or_huge_content_lengths_are_4xx_not_a_hang(url):
    status, body = _raw(url, "Content-Length: -1\r\n")
    assert status == 400 and "Content-Length -1: allowed 0 to" in body["error"]["message"]
    status, body = _raw(url, f"Content-Length: {10**12}\r\n")
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, body = _raw(url, "Content-Length: lots\r\n")
    assert status == 411
    status, body = _raw(url, "Content-Length: 3\r\n", b"{x}")
    assert status == 400 and body["error"]["code"] == "invalid_json"


def test_a_request_http_cannot_parse_is_a_json_400(url):
    status, body = _raw(url, "Content-Length: 2\r\nno colon in this header\r\n", b"{}")
    assert status == 400 and body["error"]["message"].startswith("malformed HTTP request")
    assert "\n" not in body["error"]["message"]


def test_a_burst_of_200_requests_from_20_clients_all_get_answers_with_memory_bounded(url):
    import resource
    from concurrent.futures import ThreadPoolExecutor

    def ask(i: int) -> int:
        return _post(url, {"model": "alpha", "prompt": f"Say {i}.", "max_tokens": 1})[0]

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(ask, range(200)))
    assert statuses == [200] * 200
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grew_mib < 256, f"the process's peak RSS grew by {grew_mib:.0f} MiB over 200 small requests"


def test_sigterm_lets_the_request_in_flight_finish(tiny_base, adapter):
    """`qlorakit serve` in its own process: a request waiting in the decoding thread's batch window (4 s, so the
    request is surely queued when SIGTERM comes 1 s after it was sent) still gets its reply, and the server then
    exits 0."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "qlorakit.cli", "serve", "--model", str(tiny_base), "--adapter",
                             f"alpha={adapter}", "--port", "0", "--device", "cpu", "--batch-window-ms", "4000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://[^:]+:(\d+)/v1", line).group(1))
        got = {}

        def ask() -> None:
            got["reply"] = _post(f"http://127.0.0.1:{port}/v1/completions",
                                 {"model": "alpha", "prompt": "hi", "max_tokens": 2})

        client = threading.Thread(target=ask)
        client.start()
        time.sleep(1.0)  # the request now waits in the 4 s batch window
        proc.send_signal(signal.SIGTERM)
        client.join(30)
        assert got["reply"][0] == 200 and got["reply"][1]["choices"][0]["text"] is not None
        assert proc.wait(30) == 0
        assert "SIGTERM: finishing the requests in flight" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
