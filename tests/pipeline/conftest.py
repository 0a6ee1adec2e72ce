"""Session fixtures of the pipeline tests: one tiny Llama folder, a twin with other weights, the toy data, and
one trained run that several tests inspect (see pipeline_helpers.py for what they hold)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from pipeline_helpers import one_thread, run_tree, save_tiny_model, write_pattern_data, write_yaml


@pytest.fixture(scope="module", autouse=True)
def single_threaded_module():
    """Module fixtures and tests run single-threaded (pipeline_helpers.one_thread); session fixtures that train
    say so themselves."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory) -> Path:
    """Same architecture and shapes as tiny_model_dir, other random weights."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-other"), "llama", seed=1)


@pytest.fixture(scope="session")
def pattern_data(tmp_path_factory) -> Path:
    return write_pattern_data(tmp_path_factory.mktemp("data") / "pattern.jsonl")


@dataclass
class CliRun:
    exit_code: int
    run_dir: Path


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, pattern_data, tmp_path_factory) -> CliRun:
    """`qlorakit train run.yaml --set ...` on the toy data: 10 steps of batch 4 with LoRA dropout, gradient
    checkpointing on, eval before training and every 5 steps. Its adapter has nonzero B matrices."""
    from qlorakit import cli

    root = tmp_path_factory.mktemp("yaml-run")
    run_dir = root / "run"
    tree = run_tree(tiny_model_dir, pattern_data, run_dir,
                    training={"max_steps": 10, "eval_every": 5, "gradient_checkpointing": True})
    config_path = write_yaml(root / "run.yaml", tree)
    with one_thread():
        code = cli.main(["train", str(config_path), "--no-progress", "--set", "training.batch_size=4",
                         "--set", "lora.dropout=0.05"])
    return CliRun(code, run_dir)
