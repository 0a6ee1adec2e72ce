"""`qlorakit eval --tasks`: lm-evaluation-harness tasks on a model qlorakit loaded, through the harness's own Python
API, so every task, prompt, filter and metric is the harness's, unchanged: `lm_eval.simple_evaluate` with an `HFLM`
wrapped around the loaded model object (its linears qlorakit's Linear4bit / LoraLinear modules) and its tokenizer.

HFLM takes a loaded transformers model as `pretrained` and needs nothing patched; the subclass here only lets the
command's --no-progress reach the harness's request bars and describes the model itself instead of asking the hub
for a revision. This module imports lm_eval at the top: the command imports it only when --tasks is given, and says
in one line how to install the harness when it is missing.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lm_eval import __version__ as LM_EVAL_VERSION  # noqa: N812 - the harness's version, recorded in the JSON
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from torch import nn

from ..errors import OptionValueError, QlorakitError

__all__ = ["LM_EVAL_VERSION", "HarnessRun", "QlorakitLM"]

# The harness warns that a model object passed as `pretrained` makes it ignore its loading arguments: qlorakit
# loaded the model on purpose, so these two lines say nothing to a user of `qlorakit eval`.
_EXPECTED = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through")


class QlorakitLM(HFLM):
    """The harness's HF backend over a model object qlorakit built (4-bit base, adapters): scoring, batching and
    tokenization are HFLM's own; progress bars follow `progress`, and get_model_info reports `info`."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int, progress: bool,
                 info: dict[str, Any]) -> None:
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.progress, self.info = progress, dict(info)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.progress)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.progress)

    def get_model_info(self) -> dict[str, Any]:
        return dict(self.info)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED)


@contextlib.contextmanager
def _harness_logging() -> Iterator[None]:
    """The harness's INFO lines (seeds, contexts built, request counts) only with `qlorakit -v`; its warnings
    always, but the two about a model object. Put back as they were afterwards."""
    root = logging.getLogger("lm_eval")
    hf = logging.getLogger("lm_eval.models.huggingface")
    level, drop = root.level, _DropExpected()
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        root.setLevel(logging.WARNING)
    hf.addFilter(drop)
    try:
        yield
    finally:
        hf.removeFilter(drop)
        root.setLevel(level)


def _first_line(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class HarnessRun:
    """The tasks of one `qlorakit eval`: found, checked and their data sets loaded once, before any model loads;
    then `evaluate(model, tokenizer)` per model."""

    def __init__(self, tasks: str, *, include_path: str | None, num_fewshot: int | None, limit: int | None,
                 apply_chat_template: bool, bootstrap_iters: int, batch_size: int, log_samples: bool,
                 progress: bool) -> None:
        self.names = [t.strip() for t in tasks.split(",") if t.strip()]
        if not self.names:
            raise OptionValueError(f"--tasks {tasks!r}: no task named; give TASK[,TASK...]")
        if include_path is not None and not Path(include_path).is_dir():
            raise OptionValueError(f"--include-path {include_path}: folder not found")
        self.include_path, self.num_fewshot, self.limit = include_path, num_fewshot, limit
        self.apply_chat_template, self.bootstrap_iters = apply_chat_template, bootstrap_iters
        self.batch_size, self.log_samples, self.progress = batch_size, log_samples, progress
        with _harness_logging():
            self.manager = TaskManager(include_path=include_path)
            self._check_names()
            self._load_once()

    def _check_names(self) -> None:
        known = set(self.manager.all_tasks)
        for name in self.names:
            if name in known or (Path(name).suffix in (".yaml", ".yml") and Path(name).is_file()):
                continue  # a task's name, or the path of a task YAML file (the harness takes both)
            close = difflib.get_close_matches(name, self.manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = f" --include_path {self.include_path}" if self.include_path else ""
            raise OptionValueError(f"--tasks: no lm-evaluation-harness task, group or tag is named {name!r}{hint}; "
                                   f"`lm-eval ls tasks{where}` lists them (local task folders: --include-path DIR)")

    def _load_once(self) -> None:
        """Build every task once, so that a data set that cannot be read (not in the datasets cache and no network,
        a missing local file) is one line before any model is loaded; the datasets cache makes the per-model builds
        cheap. The harness fetches a hub task's data set as it always does: qlorakit neither blocks nor adds that."""
        for name in self.names:
            try:
                self.manager.load([name])
            except Exception as err:  # noqa: BLE001 - whatever the task's loader raises, one line naming the task
                raise QlorakitError(f"--tasks {name}: cannot build the task ({type(err).__name__}: "
                                    f"{_first_line(err)}); a task whose data set is on the hub needs the hub once "
                                    "(the datasets cache keeps it), a local task a readable data file") from None

    def evaluate(self, model: nn.Module, tokenizer: Any, info: dict[str, Any]) -> dict[str, Any]:
        """simple_evaluate on this model: the harness's results dict (results, n-samples, versions, ... and, with
        log_samples, samples)."""
        with _harness_logging():
            lm = QlorakitLM(model, tokenizer, batch_size=self.batch_size, progress=self.progress, info=info)
            out = simple_evaluate(model=lm, tasks=list(self.names), num_fewshot=self.num_fewshot, limit=self.limit,
                                  task_manager=self.manager, bootstrap_iters=self.bootstrap_iters,
                                  log_samples=self.log_samples, apply_chat_template=self.apply_chat_template)
        assert out is not None  # one process: rank 0
        return out


def task_scores(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: {metric: value, metric_stderr: value or None, 'n': items}} from a harness results dict; a metric
    under a filter other than 'none' is named 'metric (filter)'."""
    scores: dict[str, dict[str, Any]] = {}
    for task, values in out["results"].items():
        row: dict[str, Any] = {}
        for key, value in values.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr"):
                continue
            name = metric if filt == "none" else f"{metric} ({filt})"
            err = values.get(f"{metric}_stderr,{filt}")
            row[name] = value
            row[f"{name}_stderr"] = err if isinstance(err, (int, float)) else None
        n = out.get("n-samples", {}).get(task, {})
        if n:
            row["n"] = n.get("effective", n.get("original"))
        scores[task] = row
    return scores


def task_samples(out: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per task, each item's doc id, target, responses (log-likelihood and is-greedy per choice, or text) and
    scores, as JSON-ready values."""
    from lm_eval.utils import handle_non_serializable

    samples: dict[str, list[dict[str, Any]]] = {}
    for task, items in (out.get("samples") or {}).items():
        rows = []
        for s in items:
            row = {"doc_id": s["doc_id"], "target": s["target"], "responses": s["filtered_resps"]}
            row.update({m: s[m] for m in s.get("metrics", []) if m in s})
            rows.append(json.loads(json.dumps(row, default=handle_non_serializable)))
        samples[task] = rows
    return samples
