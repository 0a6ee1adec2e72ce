"""`qlorakit serve`: an OpenAI-compatible HTTP server for one 4-bit base and several LoRA adapters.

Endpoints (JSON in, JSON out; app.py): GET /v1/models, GET /health, POST /v1/completions (raw prompt), POST
/v1/chat/completions (the tokenizer's chat template). The request's `model` names an adapter (NAME of --adapter
NAME=DIR) or the base (its --model value); any other name is a 404 JSON error.

The base is loaded once; every module that any adapter targets gets one LoraLinear holding all adapters' A/B
tensors stacked (nn.lora.AdapterBankSlot); each row of a batch takes the adapter its request named, and modules
an adapter does not target get a zero update, so nothing is swapped between requests. One decoding thread takes
the requests: those that arrive within a few milliseconds of each other (batch_window_ms, up to max_batch) with
the same sampling settings are decoded together in one batch, whatever adapters they name, in rounds of
ROUND_TOKENS tokens; requests that arrive meanwhile join at the next round (continuing rows are prefilled again
from their prompt and reply so far).
`AdapterServer.generate_batch` does the same for a list of prompts from Python. Sampling defaults to greedy (temperature 0), unlike OpenAI's 1.0,
so that replies are reproducible; pass `temperature` to sample. The web layer (FastAPI on uvicorn: app.py,
http_server.py) hands each request to the decoding thread and awaits it; `stream: true` sends server-sent events
in OpenAI's chunk format as tokens are made (streaming.py). A client that goes away, streaming or not, cancels
its request: it takes no further decoding rounds. What a request may hold is checked before it is queued
(requests.py: 4xx with one line); SIGTERM stops accepting and lets the requests in flight finish.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import QlorakitError
from .http_server import attach_app, bind_server, make_server  # noqa: F401 (make_server: for callers of serve)
from .requests import MAX_BODY_BYTES, check_fits
from .served_adapters import AdapterWeights, _read_adapter_weights, parse_adapter_specs  # noqa: F401

log = logging.getLogger("qlorakit.infer")

MAX_ROWS = 64  # rows of one batch (generate_batch); each may take its own adapter
ROUND_TOKENS = 16  # tokens per decoding round; requests that arrived meanwhile join the next round


class AdapterServer:
    """The loaded base, its LoRA layers with every adapter stacked, and the decoding thread that batches requests."""

    def __init__(self, model: str, adapters: dict[str, Path], *, force: bool = False, device: str | None = None,
                 progress: bool = True, max_batch: int = 16, batch_window_ms: float = 5.0):
        if not 1 <= max_batch <= MAX_ROWS:
            raise QlorakitError(f"--max-batch {max_batch}: allowed 1 to {MAX_ROWS}")
        if not batch_window_ms >= 0:
            raise QlorakitError(f"--batch-window-ms {batch_window_ms}: must be >= 0")
        from ..adapters.fingerprint import base_fingerprint
        from ..adapters.loftq import check_base_kind
        from ..adapters.peft_format import check_adapter_fits
        from ..model.build import (inference_dtype, load_tokenizer, resolve_device, resolve_model_dir,
                                   trained_quantization)
        from ..model.lora_inject import inject_lora, keep_dense_copies_on_cpu
        from ..model.loader import load_model

        model_dir = resolve_model_dir(model)
        dev = resolve_device(device)
        self.dtype = inference_dtype(dev)
        self.base_name = model
        fingerprint = base_fingerprint(model_dir)
        self.adapters = {name: _read_adapter_weights(name, folder, self.dtype, fingerprint, force)
                         for name, folder in adapters.items()}
        if model in self.adapters:
            raise QlorakitError(f"--adapter {model}=...: an adapter may not be named like the base model")
        self.tokenizer = load_tokenizer(model_dir)
        # The base as the adapters were trained on it (their records); adapters of different quantizations refused.
        quant = trained_quantization({name: a.record for name, a in self.adapters.items()})
        for a in self.adapters.values():
            check_base_kind(a.record, True, a.path)
        self.net, report = load_model(model_dir, **quant, compute_dtype=self.dtype, device=dev, progress=progress)
        log.info("qlorakit: %s", report.line())
        for a in self.adapters.values():
            check_adapter_fits(a.path, a.config, a.tensors, self.net)
        targets = sorted({m for a in self.adapters.values() for m in a.tensors})
        if targets:
            inject_lora(self.net, targets, r=1, alpha=1.0, dropout=0.0, adapter_dtype=self.dtype)
        self.layers = {name: self.net.get_submodule(name) for name in targets}
        if dev.type == "cpu":
            keep_dense_copies_on_cpu(self.net, self.dtype)
        self.net.eval()
        self.order = [None, *self.adapters]  # bank index -> adapter name (0: the base alone)
        self.rows = torch.zeros(MAX_ROWS, dtype=torch.long, device=dev)
        self._build_bank(dev)
        self.lock = threading.Lock()
        self.max_batch, self.batch_window_s = max_batch, batch_window_ms / 1000.0
        self.context: int | None = getattr(self.net.config, "max_position_embeddings", None)
        self.max_body_bytes = MAX_BODY_BYTES
        self._jobs: queue.Queue = queue.Queue()
        self._queue_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        # decoding rounds, rows over all rounds, tokens made, requests ended because their client went away
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "cancelled": 0}

    @property
    def model_ids(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def _build_bank(self, device: torch.device) -> None:
        """Stack every adapter's A and B per layer (ranks padded with zeros, index 0 all zeros) and hand each
        LoraLinear its AdapterBankSlot: a batch's rows then each take their own adapter, with no swapping."""
        from ..nn.lora import AdapterBankSlot

        for module, layer in self.layers.items():
            ranks = [a.tensors[module][0].shape[0] for a in self.adapters.values() if module in a.tensors]
            r = max(ranks)
            n = len(self.order)
            a_stack = torch.zeros(n, r, layer.in_features, dtype=self.dtype, device=device)
            b_stack = torch.zeros(n, layer.out_features, r, dtype=self.dtype, device=device)
            scale = torch.zeros(n, dtype=torch.float32, device=device)
            for i, name in enumerate(self.order[1:], start=1):
                adapter = self.adapters[name]
                pair = adapter.tensors.get(module)
                if pair is None:
                    continue  # this adapter leaves the module alone: a zero update
                a, b = pair
                a_stack[i, :a.shape[0]] = a.to(device)
                b_stack[i, :, :b.shape[1]] = b.to(device)
                scale[i] = adapter.scaling
            layer.set_bank(AdapterBankSlot(a_stack, b_stack, scale, self.rows))

    def select(self, models: list[str]) -> None:
        """Row i of the next batch takes adapter models[i] (an adapter name, or the base's name: no adapter)."""
        if len(models) > MAX_ROWS:
            raise QlorakitError(f"{len(models)} rows in one batch; at most {MAX_ROWS}")
        index = [self.order.index(m) if m in self.adapters else 0 for m in models]
        self.rows[:len(index)].copy_(torch.tensor(index, dtype=torch.long))

    def generate_batch(self, models: list[str], prompts: list[str], *, max_tokens: int, chat: bool = True,
                       temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
        """One reply per prompt, all decoded in one batch, row i with adapter models[i] (or the base)."""
        if len(models) != len(prompts):
            raise QlorakitError(f"{len(models)} model names for {len(prompts)} prompts")
        unknown = sorted({m for m in models if m not in self.model_ids})
        if unknown:
            raise QlorakitError(f"unknown model {unknown[0]!r}; this server has {', '.join(self.model_ids)}")
        jobs = [self._job(m, p, None, chat, max_tokens, temperature, top_p) for m, p in zip(models, prompts)]
        self._decode(jobs)
        return [j.result[0] for j in jobs]

    def generate(self, model: str, prompt: str, *, chat_history: list[dict[str, str]] | None, chat: bool,
                 max_tokens: int, temperature: float, top_p: float) -> tuple[str, int, int]:
        """(reply text, prompt tokens, completion tokens) for `model` (an adapter name or the base name). Requests
        that arrive within `batch_window_s` of each other with the same sampling settings are decoded together,
        one row each, with their own adapters."""
        job = self.submit(self._job(model, prompt, chat_history, chat, max_tokens, temperature, top_p))
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def submit(self, job: _Job) -> _Job:
        """Queue `job` for the decoding thread (started on first use); returns it."""
        with self._queue_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve_jobs, name="qlorakit-serve", daemon=True)
                self._worker.start()
        self._jobs.put(job)
        return job

    def _job(self, model, prompt, history, chat, max_tokens, temperature, top_p) -> _Job:
        from .generate import prompt_ids

        ids = prompt_ids(self.tokenizer, prompt, use_chat_template=chat, history=history)
        check_fits(len(ids), max_tokens, self.context)  # a 400 now, not an allocation for 10^9 tokens later
        return _Job(model, ids, max_tokens, temperature, top_p)

    def _serve_jobs(self) -> None:
        """The decoding thread. With nothing in progress it takes the next request and waits up to batch_window_s
        for more (at most max_batch); then it decodes in rounds of ROUND_TOKENS tokens, each group of equal sampling
        settings as one batch, and before every round takes in whatever arrived meanwhile: a short request that
        comes behind a long one joins at the next round instead of waiting for the long one to end."""
        active: list[_Job] = []
        while True:
            if not active:
                active = [self._jobs.get()]
                deadline = time.monotonic() + self.batch_window_s
                while len(active) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    try:
                        active.append(self._jobs.get(timeout=left))
                    except queue.Empty:
                        break
            while len(active) < self.max_batch:
                try:
                    active.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for job in active:
                if job.cancelled.is_set() and not job.finished:
                    self._end(job)  # its client left while it waited: no round for it
            groups: dict[tuple[float, float], list[_Job]] = {}
            for job in active:
                if not job.finished:
                    groups.setdefault((job.temperature, job.top_p), []).append(job)
            for jobs in groups.values():
                try:
                    self._round(jobs)
                except BaseException as err:  # noqa: BLE001 - each waiting request gets the error
                    for job in jobs:
                        job.error, job.finished = err, True
            for job in active:
                if job.finished:
                    job.done.set()
                    if job.stream is not None:
                        job.stream.put(None)  # the end of the stream, whatever happened
                    if job.on_done is not None:
                        job.on_done()
            active = [job for job in active if not job.finished]

    def _decode(self, jobs: list[_Job]) -> None:
        """Decode `jobs` to the end in this thread (round after round); each job's `result` is then set."""
        while not all(job.finished for job in jobs):
            self._round([job for job in jobs if not job.finished])

    def _round(self, jobs: list[_Job]) -> None:
        """Up to ROUND_TOKENS more tokens of each job, in one batch: a continuing job's prompt is its prompt and
        its reply so far (prefilled again). A job ends at its end-of-sequence token, its max_tokens, or when its
        streaming client went away."""
        from .generate import _eos_ids, decode_rows

        eos = set(_eos_ids(self.net, self.tokenizer))
        limits = [min(ROUND_TOKENS, job.max_tokens - len(job.generated)) for job in jobs]
        ended = [False] * len(jobs)

        def on_step(i: int, tokens: torch.Tensor) -> bool:
            """Stream each row's new token to its request; stop early when every request has gone away."""
            for row, job in enumerate(jobs):
                if job.stream is None or ended[row] or i >= limits[row]:
                    continue
                t = int(tokens[row])
                if t in eos:
                    ended[row] = True
                else:
                    job.stream.put(t)
            return not all(job.cancelled.is_set() for job in jobs)

        with self.lock:
            self.select([j.model for j in jobs])
            new = decode_rows(self.net, self.tokenizer, [j.ids + j.generated for j in jobs], limits,
                              temperature=jobs[0].temperature, top_p=jobs[0].top_p, on_step=on_step)
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["tokens"] += sum(len(ids) for ids in new)
        for job, ids, limit in zip(jobs, new, limits):
            job.generated += ids
            if len(ids) < limit or len(job.generated) >= job.max_tokens or job.cancelled.is_set():
                self._end(job)

    def _end(self, job: _Job) -> None:
        """Mark `job` finished with its reply so far (the decoding thread then wakes whoever waits for it)."""
        job.finished = True
        job.result = (self.tokenizer.decode(job.generated, skip_special_tokens=True), len(job.ids),
                      len(job.generated))
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1


@dataclass
class _Job:
    """One request waiting for the decoding thread."""

    model: str
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[str, int, int] | None = None
    error: BaseException | None = None
    stream: Any = None  # streaming: something with put(), given each new token id as it is made, then None
    on_done: Callable[[], None] | None = None  # called by the decoding thread once done is set
    cancelled: threading.Event = field(default_factory=threading.Event)  # its client went away
    generated: list[int] = field(default_factory=list)  # the reply's token ids so far (rounds of ROUND_TOKENS)
    finished: bool = False


def serve_command(args) -> int:
    server = bind_server(args.host, args.port)
    try:
        app = AdapterServer(args.model, parse_adapter_specs(args.adapter or []), force=args.force,
                            device=args.device, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms)
        attach_app(server, app)
        host, port = server.server_address[:2]
        print(f"qlorakit: serving {', '.join(app.model_ids)} on http://{host}:{port}/v1 (concurrent requests "
              f"decoded together, up to {app.max_batch} per batch)", flush=True)
        server.serve_forever(drain_on_signals=True)
    finally:
        server.server_close()
    return 0
