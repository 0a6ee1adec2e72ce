"""benchmarks/peers.py, the peers' side of benchmarks/train_step.py, runs end to end on CPU with a toy shape
(--device cpu --tiny): a peer that can run is measured into OUT/peers.json in the layout train_step.py reads, and
one that cannot (Unsloth without CUDA) is recorded as an error while the others still run. This tests the
harness only; its timings mean nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


def test_peers_script_measures_bnb_peft_and_records_unsloth_as_needing_cuda(tmp_path):
    out, workdir = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "bnb-peft", "unsloth", "--device", "cpu", "--tiny", "--shape", "llama3-8b",
           "--batches", "1x32", "--steps", "4", "--out", str(out), "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    peers = json.loads((out / "peers.json").read_text())
    assert set(peers) == {"bnb-peft", "unsloth"}
    bnb = peers["bnb-peft"]
    row = bnb["B1xT32"]
    for key in ("tok_per_s", "step_s", "loss"):
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert "torch_peak_GiB" in row and row["torch_peak_GiB"] is None  # torch counts no CPU allocations
    assert "nvml_peak_GiB" in row and row["nvml_peak_GiB"] is None  # no NVML without CUDA
    assert bnb["versions"]["bitsandbytes"] and bnb["lora_dropout"] == 0.05 and bnb["rank"] == 64
    # train_step.py prints every key starting with "B" as a row: only the measured batch shapes may.
    assert [k for k in bnb if k.startswith("B")] == ["B1xT32"]

    assert set(peers["unsloth"]) == {"error"}
    assert "CUDA" in peers["unsloth"]["error"] and "\n" not in peers["unsloth"]["error"]
    assert list(workdir.iterdir()) == [workdir / "llama3-8b-tiny-2L"]  # the checkpoint, and no leftovers
