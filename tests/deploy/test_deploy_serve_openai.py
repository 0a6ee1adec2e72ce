"""The official `openai` Python client against a local `qlorakit serve` on 127.0.0.1: chat, completion and
streamed chat and completion, for two adapters and the base, each reply equal to `qlorakit generate`'s; the
client's own errors for a bad request and an unknown model."""

from __future__ import annotations

import openai
import pytest
from deploy_helpers import serving, slow_decoding

from qlorakit import cli
from qlorakit.infer.serve import AdapterServer

PROMPT = "What is two plus two?"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def client(tiny_base, adapter, adapter_b):
    app = AdapterServer(str(tiny_base), {"alpha": adapter, "beta": adapter_b}, device="cpu", progress=False)
    with serving(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _generate(capsys, base, adapter_dir, chat: bool) -> str:
    args = ["generate", "--model", str(base), "--prompt", PROMPT, "--max-new-tokens", str(MAX_TOKENS),
            "--device", "cpu"]
    if adapter_dir is not None:
        args += ["--adapter", str(adapter_dir)]
    if not chat:
        args.append("--no-chat-template")
    capsys.readouterr()
    assert cli.main(args) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_chat_completion_and_streams_equal_generate_for_adapters_and_base(client, tiny_base, adapter, adapter_b,
                                                                          capsys):
    for name, folder in (("alpha", adapter), ("beta", adapter_b), (str(tiny_base), None)):
        want_chat = _generate(capsys, tiny_base, folder, chat=True)
        want_text = _generate(capsys, tiny_base, folder, chat=False)
        messages = [{"role": "user", "content": PROMPT}]
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS)
        assert reply.choices[0].message.content == want_chat and reply.model == name
        assert reply.usage.completion_tokens <= MAX_TOKENS
        pieces = [c.choices[0].delta.content or "" for c in
                  client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS, stream=True)]
        assert "".join(pieces) == want_chat
        completion = client.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS)
        assert completion.choices[0].text == want_text
        streamed = client.completions.create(model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True)
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks) == want_text
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_stream_arrives_in_several_pieces_with_a_finish_reason(client):
    chunks = list(client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=MAX_TOKENS, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices[0].delta.content) >= 2  # token by token, not one block
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_client_sees_4xx_errors_with_their_one_line(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="alpha", prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="alpha", prompt="hi", max_tokens=10**6)


def test_a_short_request_behind_a_long_one_finishes_first(tiny_base, adapter, monkeypatch):
    """The decoding thread takes in new requests before every decoding step: a 2-token request sent while a
    100-token one is decoding joins it at the next step and is answered long before the long one ends (decoding
    steps slowed to 20 ms, so the order does not depend on this machine's speed; test_deploy_serve_steps.py counts
    the steps exactly)."""
    import time

    slow_decoding(monkeypatch)
    app = AdapterServer(str(tiny_base), {"alpha": adapter}, device="cpu", progress=False, batch_window_ms=0)
    long = app.submit(app._job("alpha", "Count to a hundred.", None, False, 100, 0.0, 1.0))
    time.sleep(0.1)
    short = app.submit(app._job("alpha", "Hi", None, False, 2, 0.0, 1.0))
    assert short.done.wait(30) and short.error is None
    assert not long.done.is_set()  # the long one is still decoding
    assert long.done.wait(60) and long.error is None and long.result[2] > 16
    alone = app._job("alpha", "Hi", None, False, 2, 0.0, 1.0)
    app._decode([alone])
    assert short.result == alone.result  # joining a running batch changed nothing in the short reply
