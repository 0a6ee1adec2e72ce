"""Fixtures of the fault-injection suite: the pipeline tests' tiny Llama folder and toy data, and the counts the
suite prints at the end of the test session (so CI's log says how much was injected)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipeline"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_counts import FAULT_COUNTS  # noqa: E402
from pipeline_helpers import save_tiny_model, write_pattern_data  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def pattern_data(tmp_path_factory) -> Path:
    return write_pattern_data(tmp_path_factory.mktemp("data") / "pattern.jsonl")


def pytest_terminal_summary(terminalreporter) -> None:
    if FAULT_COUNTS:
        terminalreporter.write_sep("-", "fault injection")
        for what, count in FAULT_COUNTS.items():
            terminalreporter.write_line(f"{what}: {count}")
