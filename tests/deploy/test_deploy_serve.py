"""`qlorakit serve`: an OpenAI-compatible server on 127.0.0.1 with two adapters on one 4-bit base. Interleaved
requests for either adapter (and the base) get exactly the reply `qlorakit generate` gives with that adapter
(greedy); unknown models and routes are JSON 404s. The official openai client: test_deploy_serve_openai.py."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy_helpers import serving

from qlorakit import cli
from qlorakit.errors import QlorakitError
from qlorakit.infer.serve import AdapterServer, make_server, parse_adapter_specs

PROMPT = "What is two plus two?"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(tiny_base, adapter, adapter_b):
    app = AdapterServer(str(tiny_base), {"alpha": adapter, "beta": adapter_b}, device="cpu", progress=False)
    with serving(app) as url:
        yield url, str(tiny_base)


def _call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _cli_generate(capsys, base: str, adapter_dir, chat: bool) -> str:
    args = ["generate", "--model", base, "--prompt", PROMPT, "--max-new-tokens", str(MAX_TOKENS), "--device", "cpu"]
    if adapter_dir is not None:
        args += ["--adapter", str(adapter_dir)]
    if not chat:
        args.append("--no-chat-template")
    capsys.readouterr()
    assert cli.main(args) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_models_lists_the_base_and_adapters(server):
    url, base = server
    status, body = _call(url + "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [base, "alpha", "beta"]


def test_interleaved_requests_match_qlorakit_generate(server, adapter, adapter_b, capsys):
    url, base = server
    dirs = {"alpha": adapter, "beta": adapter_b, base: None}
    order = [("alpha", False), ("beta", False), (base, False), ("alpha", True), ("beta", True), ("alpha", False)]
    replies = {}
    for model, chat in order:
        if chat:
            status, body = _call(url + "/v1/chat/completions", {
                "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS})
            text = body["choices"][0]["message"]["content"]
            assert body["object"] == "chat.completion"
        else:
            status, body = _call(url + "/v1/completions", {"model": model, "prompt": PROMPT,
                                                            "max_tokens": MAX_TOKENS})
            text = body["choices"][0]["text"]
            assert body["object"] == "text_completion"
        assert status == 200 and body["model"] == model
        replies.setdefault((model, chat), set()).add(text)
    for (model, chat), texts in replies.items():
        assert texts == {_cli_generate(capsys, base, dirs[model], chat)}, (model, chat)
    assert replies[("alpha", False)] != replies[("beta", False)]  # the adapters really differ
    assert all(len(texts) == 1 and "" not in texts for texts in replies.values())  # deterministic, non-empty


def test_unknown_model_and_route_are_json_404s(server):
    url, _ = server
    status, body = _call(url + "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert status == 404 and body["error"]["code"] == "model_not_found" and "alpha" in body["error"]["message"]
    status, body = _call(url + "/v1/embeddings", {"model": "alpha", "input": "hi"})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = _call(url + "/v1/chat/completions", {"model": "alpha", "messages": []})
    assert status == 400


def test_health_answers_and_a_trailing_slash_or_a_wrong_method_changes_nothing(server):
    url, base = server
    status, body = _call(url + "/health")
    assert status == 200 and body == {"status": "ok", "models": [base, "alpha", "beta"]}
    status, body = _call(url + "/v1/models/")
    assert status == 200 and [m["id"] for m in body["data"]] == [base, "alpha", "beta"]
    status, body = _call(url + "/v1/completions")  # GET of a POST route: no such route, as before
    assert status == 404 and body["error"]["code"] == "not_found" and "/v1/completions" in body["error"]["message"]


def test_adapter_specs_are_name_equals_dir():
    assert parse_adapter_specs(["a=x/y", "b=z"]) == {"a": Path("x/y"), "b": Path("z")}
    with pytest.raises(QlorakitError, match="expected NAME=DIR"):
        parse_adapter_specs(["just-a-dir"])
    with pytest.raises(QlorakitError, match="given twice"):
        parse_adapter_specs(["a=x", "a=y"])


def test_one_batch_with_a_different_adapter_per_row_matches_one_request_each(tiny_base, adapter, adapter_b):
    """generate_batch decodes rows for alpha, beta, the base and alpha again together (left-padded prompts of
    different lengths), each row with its own adapter: the same replies as one request at a time."""
    app = AdapterServer(str(tiny_base), {"alpha": adapter, "beta": adapter_b}, device="cpu", progress=False)
    base = str(tiny_base)
    models = ["alpha", "beta", base, "alpha"]
    prompts = [PROMPT, "Name a colour.", "Say something nice about the weather today.", "Hi"]
    batch = app.generate_batch(models, prompts, max_tokens=MAX_TOKENS, chat=True)
    one_by_one = [app.generate(m, p, chat_history=None, chat=True, max_tokens=MAX_TOKENS, temperature=0.0,
                               top_p=1.0)[0] for m, p in zip(models, prompts)]
    assert batch == one_by_one
    base_reply = app.generate(base, PROMPT, chat_history=None, chat=True, max_tokens=MAX_TOKENS, temperature=0.0,
                              top_p=1.0)[0]
    assert batch[0] != base_reply  # row 0 really took its adapter
    with pytest.raises(QlorakitError, match="unknown model 'gamma'"):
        app.generate_batch(["gamma"], [PROMPT], max_tokens=2)


def test_concurrent_requests_are_decoded_together_each_with_its_adapter(tiny_base, adapter, adapter_b):
    """Six HTTP requests sent at once for alpha, beta and the base: the decoding thread batches them (fewer
    prefills than requests, one prefilled row per request), and every reply is the one that request gets alone."""
    app = AdapterServer(str(tiny_base), {"alpha": adapter, "beta": adapter_b}, device="cpu", progress=False,
                        batch_window_ms=300.0)
    base = str(tiny_base)
    alone = {m: app.generate_batch([m], [PROMPT], max_tokens=MAX_TOKENS, chat=True)[0] for m in ("alpha", "beta", base)}
    before = dict(app.stats)
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions"
    models = ["alpha", "beta", base, "beta", "alpha", base]
    replies: dict[int, str] = {}

    def ask(i: int, model: str) -> None:
        status, body = _call(url, {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                                   "max_tokens": MAX_TOKENS})
        assert status == 200
        replies[i] = body["choices"][0]["message"]["content"]

    try:
        askers = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate(models)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(timeout=120)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
    assert [replies[i] for i in range(len(models))] == [alone[m] for m in models]
    rows, prefills = app.stats["rows"] - before["rows"], app.stats["prefills"] - before["prefills"]
    assert rows == len(models) and prefills < len(models)


@pytest.mark.parametrize("args,message", [
    (["--max-batch", "0"], "--max-batch 0: allowed 1 to 64"),
    (["--batch-window-ms", "-1"], "--batch-window-ms -1.0: allowed a finite number >= 0"),
])
def test_bad_batching_options_are_one_line_errors(tiny_base, capsys, args, message):
    assert cli.main(["serve", "--model", str(tiny_base), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
