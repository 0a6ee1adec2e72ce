"""Continuous batching in `qlorakit serve` (infer/batcher.py over infer/slots.py), measured in decoding steps, never
in wall time: the decoding thread counts its shared one-token steps (AdapterServer.stats["steps"]) and calls
AdapterServer.on_step after each, in its own thread, so a test can queue a request after exactly the step it
chooses. A request joins the running batch at the next step; a row that ends or is cancelled frees its slot at
once; a continuing row is never prefilled again; and every greedy reply equals `qlorakit generate`'s whatever else
is in the batch (another adapter, another prompt length, a sampled neighbour, a cache widened under it)."""

from __future__ import annotations

import pytest

from qlorakit import cli
from qlorakit.infer import batcher
from qlorakit.infer.serve import AdapterServer
from qlorakit.infer.slots import SlotDecoder

LONG_PROMPT, LONG = "Count to a hundred.", 60
SHORT_PROMPT, SHORT = "Name a colour.", 4


@pytest.fixture
def app(tiny_base, adapter, adapter_b):
    return AdapterServer(str(tiny_base), {"alpha": adapter, "beta": adapter_b}, device="cpu", progress=False,
                         batch_window_ms=0)


@pytest.fixture
def prefilled(monkeypatch) -> list[list[int]]:
    """Every prompt SlotDecoder.prefill is given, in order (a hook on it)."""
    seen: list[list[int]] = []
    real = SlotDecoder.prefill

    def spy(self, slots, rows):
        seen.extend(list(r) for r in rows)
        return real(self, slots, rows)

    monkeypatch.setattr(SlotDecoder, "prefill", spy)
    return seen


def _generate(capsys, base, adapter_dir, prompt: str, max_tokens: int, *sampling: str) -> str:
    """`qlorakit generate`'s reply to the raw prompt (no chat template), greedy unless `sampling` flags say."""
    args = ["generate", "--model", str(base), "--prompt", prompt, "--max-new-tokens", str(max_tokens), "--device",
            "cpu", "--no-chat-template", *sampling]
    if adapter_dir is not None:
        args += ["--adapter", str(adapter_dir)]
    capsys.readouterr()
    assert cli.main(args) == 0
    return capsys.readouterr().out.removesuffix("\n")


def _join_after(app: AdapterServer, step: int, job, watch) -> dict[str, int]:
    """Queue `job` from the decoding thread right after its `step`-th step (so it is there for the next turn);
    record the step after which `job` had finished ("done") and how many tokens `watch` had then ("watched")."""
    seen: dict[str, int] = {}

    def hook(steps: int) -> None:
        if steps == step:
            seen["joined"] = steps
            app.submit(job)
        if job.finished and "done" not in seen:
            seen["done"], seen["watched"] = steps, len(watch.generated)

    app.on_step = hook
    return seen


def test_a_short_request_joins_at_the_next_step_and_finishes_first(app, tiny_base, adapter, adapter_b, capsys,
                                                                   prefilled):
    """A 60-token request for alpha runs; after its 2nd step a 4-token request for beta is queued. It is prefilled
    in the next turn (its first token) and takes its other 3 tokens in the next 3 shared steps, while the long one
    makes exactly 3 more; both replies equal `qlorakit generate`'s. Each prompt was prefilled once, alone, and
    never with its reply so far."""
    long = app._job("alpha", LONG_PROMPT, None, False, LONG, 0.0, 1.0)
    short = app._job("beta", SHORT_PROMPT, None, False, SHORT, 0.0, 1.0)
    seen = _join_after(app, 2, short, watch=long)
    app._decode([long])
    assert short.done.is_set() and short.error is None and long.error is None
    assert short.result[2] == SHORT and long.result[2] == LONG
    assert seen["done"] - seen["joined"] == SHORT - 1  # joined at the very next step, no round to wait for
    assert seen["watched"] == seen["done"] + 1 < LONG  # the long one: its prefill token and one per step
    assert prefilled == [long.ids, short.ids]
    assert app.stats["prefills"] == 2 and app.stats["rows"] == 2 and app.stats["steps"] == LONG - 1
    assert long.result[0] == _generate(capsys, tiny_base, adapter, LONG_PROMPT, LONG)
    assert short.result[0] == _generate(capsys, tiny_base, adapter_b, SHORT_PROMPT, SHORT)


def test_a_request_that_needs_a_wider_cache_joins_mid_decode(app, tiny_base, adapter, capsys, monkeypatch,
                                                             prefilled):
    """The cache is sized for the requests in it: a short request starts a narrow one, and a long request that
    joins after 2 steps makes it wider (slots copied as they are); neither reply changes from generate's."""
    monkeypatch.setattr(batcher, "MIN_WIDTH", 8)
    widths: list[int] = []
    real = SlotDecoder.__init__

    def record(self, model, slots, width, **kwargs):
        widths.append(width)
        real(self, model, slots, width, **kwargs)

    monkeypatch.setattr(SlotDecoder, "__init__", record)
    first = app._job("alpha", SHORT_PROMPT, None, False, 12, 0.0, 1.0)
    second = app._job(str(tiny_base), LONG_PROMPT, None, False, 30, 0.0, 1.0)
    seen = _join_after(app, 2, second, watch=first)
    app._decode([first])
    assert second.done.wait(120) and second.error is None and "joined" in seen
    assert len(widths) == 2 and widths[0] == first.need < second.need <= widths[1]  # widened when it came
    assert prefilled == [first.ids, second.ids]
    assert first.result[0] == _generate(capsys, tiny_base, adapter, SHORT_PROMPT, 12)
    assert second.result[0] == _generate(capsys, tiny_base, None, LONG_PROMPT, 30)


def test_greedy_and_sampled_requests_share_one_batch(app, tiny_base, adapter, capsys):
    """Sampling is per row: a greedy request and a sampled one queued together are prefilled together and
    decoded in the same steps, and each reply is `qlorakit generate`'s with its settings (the sampled row draws
    from its own generator, seeded as generate seeds it)."""
    greedy = app._job("alpha", SHORT_PROMPT, None, False, 8, 0.0, 1.0)
    sampled = app._job("alpha", LONG_PROMPT, None, False, 8, 0.9, 0.95)
    app._decode([greedy, sampled])
    assert app.stats["prefills"] == 1 and app.stats["rows"] == 2
    assert greedy.result[0] == _generate(capsys, tiny_base, adapter, SHORT_PROMPT, 8)
    assert sampled.result[0] == _generate(capsys, tiny_base, adapter, LONG_PROMPT, 8, "--temperature", "0.9",
                                          "--top-p", "0.95")


def test_a_cancelled_row_frees_its_slot_for_a_waiting_request_at_once(tiny_base, adapter, capsys):
    """One slot: a long request holds it and a second one waits in the queue. The long one's client leaves after
    step 3: it takes no further step (its prefill token and 3), and the waiting request is prefilled in that same
    turn; its reply equals generate's."""
    app = AdapterServer(str(tiny_base), {"alpha": adapter}, device="cpu", progress=False, batch_window_ms=0,
                        max_batch=1)
    long = app._job("alpha", LONG_PROMPT, None, False, LONG, 0.0, 1.0)
    waiting = app._job("alpha", SHORT_PROMPT, None, False, SHORT, 0.0, 1.0)
    started: dict[str, int] = {}

    def hook(steps: int) -> None:
        if steps == 1:
            app.submit(waiting)
        if steps == 3:
            long.cancelled.set()
        if waiting.generated and "waiting" not in started:
            started["waiting"] = steps  # the step after which it had its first tokens

    app.on_step = hook
    app._decode([long])
    assert waiting.done.wait(60) and waiting.error is None
    assert long.result[2] == 4 and app.stats["cancelled"] == 1
    assert started["waiting"] == 4  # prefilled right after step 3, then stepped
    assert waiting.result[0] == _generate(capsys, tiny_base, adapter, SHORT_PROMPT, SHORT)
