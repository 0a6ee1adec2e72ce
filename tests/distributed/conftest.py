"""Fixtures of the distributed tests: the pipeline tests' tiny Llama folder and toy data (see
tests/pipeline/pipeline_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipeline"))

from pipeline_helpers import save_tiny_model, write_pattern_data  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def pattern_data(tmp_path_factory) -> Path:
    return write_pattern_data(tmp_path_factory.mktemp("data") / "pattern.jsonl")
