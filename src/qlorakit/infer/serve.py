"""`qlorakit serve`: an OpenAI-compatible HTTP server for one 4-bit base and several LoRA adapters.

Endpoints (JSON in, JSON out; app.py): GET /v1/models, GET /health, POST /v1/completions (raw prompt), POST
/v1/chat/completions (the tokenizer's chat template). The request's `model` names an adapter (NAME of --adapter
NAME=DIR) or the base (its --model value); any other name is a 404 JSON error.

The base is loaded once; every module that any adapter targets gets one LoraLinear holding all adapters' A/B
tensors stacked (nn.lora.AdapterBankSlot); each row of a batch takes the adapter its request named, and modules
an adapter does not target get a zero update, so nothing is swapped between requests. One decoding thread takes
the requests and batches them continuously (batcher.py, slots.py): the running batch has max_batch row slots of
one static KV cache, each with its own length; a request that arrives is prefilled into a free slot (with the
others that arrived in the same turn) and joins the shared one-token decoding step at the next step, whatever
adapter and sampling settings it has; a row that ends frees its slot at once, and a continuing row is never
prefilled again. When the batch is empty the thread waits up to batch_window_ms after a request for more to
prefill with it. `AdapterServer.generate_batch` queues a list of prompts the same way from Python. Sampling
defaults to greedy (temperature 0), unlike OpenAI's 1.0, so that replies are reproducible; pass `temperature` to
sample (each sampled row draws from its own generator, seeded as `qlorakit generate` seeds it). The web layer
(FastAPI on uvicorn: app.py, http_server.py) hands each request to the decoding thread and awaits it;
`stream: true` sends server-sent events in OpenAI's chunk format as tokens are made (streaming.py). A client that
goes away, streaming or not, cancels its request: its row takes no further decoding step. What a request may hold
is checked before it is queued (requests.py: 4xx with one line); SIGTERM stops accepting and lets the requests in
flight finish.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import QlorakitError
from .batcher import _Job
from .http_server import attach_app, bind_server, make_server  # noqa: F401 (make_server: for callers of serve)
from .requests import MAX_BODY_BYTES, check_fits
from .served_adapters import AdapterWeights, _read_adapter_weights, parse_adapter_specs  # noqa: F401

log = logging.getLogger("qlorakit.infer")

MAX_ROWS = 64  # row slots of the running batch (--max-batch) at most; each may take its own adapter


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
        self.max_batch, self.batch_window_s = max_batch, batch_window_ms / 1000.0
        self.context: int | None = getattr(self.net.config, "max_position_embeddings", None)
        self.max_body_bytes = MAX_BODY_BYTES
        self._jobs: queue.Queue = queue.Queue()
        self._queue_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        # prefill calls, rows prefilled (one per request: a continuing row is never prefilled again), shared
        # one-token steps, tokens made, requests ended because their client went away
        self.stats = {"prefills": 0, "rows": 0, "steps": 0, "tokens": 0, "cancelled": 0}
        self.batcher = None  # the decoding thread's batcher.Batcher, once it runs
        self.on_step: Callable[[int], None] | None = None  # called after each shared step with the steps so far

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
        """One reply per prompt, row i with adapter models[i] (or the base); the prompts are queued together, so
        they are prefilled together into free slots and decoded in the same steps (up to max_batch at a time)."""
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
        """(reply text, prompt tokens, completion tokens) for `model` (an adapter name or the base name), decoded
        in the running batch with whatever other requests are in progress, each with its own adapter."""
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

    def _decode(self, jobs: list[_Job]) -> None:
        """Queue `jobs` and wait until each has its `result` (or `error`, the first of which is raised)."""
        for job in jobs:
            self.submit(job)
        for job in jobs:
            job.done.wait()
        errors = [job.error for job in jobs if job.error is not None]
        if errors:
            raise errors[0]

    def _job(self, model, prompt, history, chat, max_tokens, temperature, top_p) -> _Job:
        from .generate import prompt_ids

        ids = prompt_ids(self.tokenizer, prompt, use_chat_template=chat, history=history)
        check_fits(len(ids), max_tokens, self.context)  # a 400 now, not an allocation for 10^9 tokens later
        return _Job(model, ids, max_tokens, temperature, top_p)

    def _serve_jobs(self) -> None:
        """The decoding thread. With nothing in progress it waits for a request and then up to batch_window_s
        for more; while requests are in progress it takes whatever arrived meanwhile without waiting. Each turn
        prefills the newcomers into free slots and then takes one decoding step of every request in progress
        (batcher.Batcher): a request joins the running batch at the next step."""
        from .batcher import Batcher
        from .generate import _eos_ids

        batcher = self.batcher = Batcher(self.net, self.tokenizer, _eos_ids(self.net, self.tokenizer), self.select,
                                         self.max_batch, self.context, self.stats)
        while True:
            batcher.drop_cancelled()  # their slots go to the requests waiting, in this very turn
            newcomers: list[_Job] = []
            if not batcher.busy:
                newcomers.append(self._jobs.get())
                deadline = time.monotonic() + self.batch_window_s
                while len(newcomers) < batcher.free and (left := deadline - time.monotonic()) > 0:
                    try:
                        newcomers.append(self._jobs.get(timeout=left))
                    except queue.Empty:
                        break
            while len(newcomers) < batcher.free:
                try:
                    newcomers.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                batcher.admit(newcomers)
                if batcher.step() and self.on_step is not None:
                    self.on_step(self.stats["steps"])
            except BaseException as err:  # noqa: BLE001 - the requests in progress get it; the thread goes on
                batcher.fail_all(err)

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
