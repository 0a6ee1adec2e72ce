"""`qlorakit eval`: one or several models side by side on the loss over a data file's response tokens (eval_data.py)
and on lm-evaluation-harness tasks (eval_harness.py); a table with a column per model, and JSON.

Everything that can be refused is checked before the first model loads: each --model spec (folder, adapter, the
adapter's base fingerprint, precision), the data (read and tokenized with each model's tokenizer), the tasks (known
to the harness, their data sets readable). Then the models load one at a time, as `qlorakit generate` loads them,
and each is freed before the next.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..atomic import write_text
from ..errors import OptionValueError, QlorakitError
from ..options import EvalOptions
from .eval_data import eval_data, response_loss
from .eval_models import EvalModel, precision_words, resolve_model
from .eval_report import EvalReport, ModelColumn

log = logging.getLogger("qlorakit.infer")


def _harness(opts: EvalOptions):
    try:
        from . import eval_harness
    except ImportError as err:
        raise QlorakitError(f"--tasks needs lm-evaluation-harness ({err}); install it with "
                            "pip install 'qlorakit[eval]' (`make setup` does)") from None
    return eval_harness.HarnessRun(opts.tasks or "", include_path=opts.include_path, num_fewshot=opts.num_fewshot,
                                   limit=opts.limit, apply_chat_template=opts.apply_chat_template,
                                   bootstrap_iters=opts.bootstrap_iters, batch_size=opts.batch_size,
                                   log_samples=opts.log_samples, progress=opts.progress), eval_harness


def _examples_per_model(models: list[EvalModel], data) -> dict[str, Any]:
    """Each model's examples, tokenized once per distinct tokenizer (most comparisons share one)."""
    from ..data.cache import tokenizer_fingerprint
    from ..model.build import load_tokenizer

    by_tokenizer: dict[str, Any] = {}
    out = {}
    for m in models:
        tok = load_tokenizer(m.model_dir)
        key = tokenizer_fingerprint(tok)
        if key not in by_tokenizer:
            by_tokenizer[key] = data.examples(tok)
        out[m.name] = by_tokenizer[key]
    if len(by_tokenizer) > 1:
        log.warning("qlorakit: the models have %d different tokenizers: each renders the data its own way, so their "
                    "losses are per token of different tokenizations and do not compare directly", len(by_tokenizer))
    return out


def run_eval(opts: EvalOptions) -> EvalReport:
    """Evaluate every --model on --data / --config and --tasks (module docstring); the report of it all."""
    from ..model.build import inference_dtype, resolve_device, runtime_line

    t0 = time.perf_counter()
    if not (opts.data or opts.config or opts.tasks):
        raise OptionValueError("nothing to evaluate: give --data FILE, --config YAML (its held-out examples) and/or "
                               "--tasks TASK,...")
    models = [resolve_model(spec, opts.force) for spec in opts.specs()]
    device = resolve_device(opts.device)
    dtype = inference_dtype(device)
    log.info("qlorakit: %s", runtime_line(device, dtype))
    data = eval_data(opts)
    examples = _examples_per_model(models, data) if data is not None else {}
    harness, module = _harness(opts) if opts.tasks else (None, None)
    settings: dict[str, Any] = {"device": str(device), "compute_dtype": str(dtype).removeprefix("torch."),
                                "batch_size": opts.batch_size, "torch_threads": torch.get_num_threads()}
    if harness is not None:
        settings.update(num_fewshot=opts.num_fewshot, limit=opts.limit, include_path=opts.include_path,
                        apply_chat_template=opts.apply_chat_template, bootstrap_iters=opts.bootstrap_iters,
                        lm_eval_version=module.LM_EVAL_VERSION)
    columns = []
    bar = tqdm(models, desc="eval", unit="model", file=sys.stderr, disable=not opts.progress or len(models) < 2)
    for m in bar:
        bar.set_postfix_str(m.name)
        t1 = time.perf_counter()
        net, tok = m.load(device, dtype, opts.force, opts.progress)
        column = ModelColumn(m.name, m.spec.model, str(m.model_dir), m.spec.adapter,
                             precision_words(net, m.stored_4bit, m.stored_dtype()),
                             load_seconds=time.perf_counter() - t1)
        t2 = time.perf_counter()
        if data is not None:
            column.data = response_loss(net, examples[m.name], tok.pad_token_id, opts.batch_size, device,
                                        opts.progress)
        if harness is not None:
            info = {"model": m.spec.model, "precision": column.precision, "adapter": m.spec.adapter}
            out = harness.evaluate(net, tok, info)
            column.tasks = module.task_scores(out)
            column.samples = module.task_samples(out) if opts.log_samples else None
        column.eval_seconds = time.perf_counter() - t2
        columns.append(column)
        log.info("qlorakit: %s: loaded in %.1f s, evaluated in %.1f s", m.name, column.load_seconds,
                 column.eval_seconds)
        del net, tok
        gc.collect()
    bar.close()
    return EvalReport(columns, data.label if data is not None else None,
                      list(harness.names) if harness is not None else [], settings, time.perf_counter() - t0)


def eval_command(opts: EvalOptions) -> int:
    """`qlorakit eval`: the table on stdout; with --json-path, every number as JSON, written atomically."""
    report = run_eval(opts)
    print(report.table())
    if opts.json_path:
        write_text(opts.json_path, json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {opts.json_path}")
    return 0
