"""Session fixtures of the `qlorakit eval` tests: the pipeline tests' tiny Llama (bf16, ChatML tokenizer), a twin with
other weights, a PEFT adapter of it recorded as trained on its NF4 quantization, a small alpaca data file and a local
multiple-choice task (eval_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "pipeline"), str(TESTS / "deploy")]

from deploy_helpers import make_adapter  # noqa: E402
from eval_helpers import NF4_RECORD, write_alpaca_data, write_mc_task  # noqa: E402
from pipeline_helpers import one_thread, save_tiny_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def single_threaded_module():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("eval-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """Same architecture and shapes as tiny_base, other random weights (so another fingerprint)."""
    return save_tiny_model(tmp_path_factory.mktemp("eval-llama-other"), "llama", seed=1)


@pytest.fixture(scope="session")
def nf4_adapter(tiny_base, tmp_path_factory) -> Path:
    """A LoRA adapter (random A and B, all linears) whose qlorakit record says it was trained on tiny_base in NF4."""
    with one_thread():
        return make_adapter(tiny_base, tmp_path_factory.mktemp("eval-adapter") / "adapter", seed=3,
                            quantization=NF4_RECORD)


@pytest.fixture(scope="session")
def alpaca_data(tmp_path_factory) -> Path:
    return write_alpaca_data(tmp_path_factory.mktemp("eval-data") / "tasks.jsonl")


@pytest.fixture(scope="session")
def mc_task(tmp_path_factory) -> Path:
    """A folder holding a local multiple-choice task YAML (eval_helpers.MC_TASK) and its JSON data."""
    return write_mc_task(tmp_path_factory.mktemp("eval-tasks"))
