"""Merging a >= 2 GB, 4-shard bf16 checkpoint grows the merging process's peak RSS by at most 1.5x the largest
shard (benchmarks/merge_memory.py; slow: run with QLORAKIT_SLOW_TESTS=1)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("QLORAKIT_SLOW_TESTS") != "1", reason="slow: set QLORAKIT_SLOW_TESTS=1"),
]


def test_merge_peak_memory_stays_near_the_largest_shard(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "merge_memory.py"
    spec = importlib.util.spec_from_file_location("merge_memory", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.measure(size_gb=2.0, shards=4, workdir=tmp_path)
    assert result["total_bytes"] >= 2e9
    assert result["merged_linears"] == result["layers"] * 7
    assert result["peak_rss_growth_mib"] <= 1.5 * result["largest_shard_mib"], result
