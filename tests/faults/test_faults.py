"""Fault injection: `qlorakit train` killed, starved of disk and doubled up, then rerun, ends as the run that
was never disturbed, bit for bit (per-step losses and adapter tensors), with no temporary folder left.

Every run is the CLI in a child forked by fault_runner.py (single-threaded, like the reference run, so both
compute with the same kernels): 6 steps of batch 2 with LoRA dropout (the RNG state must come back), eval every
3 steps, a checkpoint every 2 (two kept). The random kill points are seeded; the counts are printed at the end
of the test session. File damage (flipped bytes, truncation, edits) is tested in-process in
tests/pipeline/test_pipeline_resume_guard.py; the counts here include it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_counts import FAULT_COUNTS
from pipeline_helpers import run_tree, train_losses
from safetensors.torch import load_file

RUNNER = Path(__file__).with_name("fault_runner.py")
STEPS = 6
KILLS = 20
CHECKPOINT_KILLS = 10


def _tree(model_dir, data, cache):
    tree = run_tree(model_dir, data, Path("unused"), lora={"dropout": 0.1},
                    training={"max_steps": STEPS, "batch_size": 2, "learning_rate": 5e-3, "save_every": 2,
                              "eval_every": 3})
    tree["data"]["cache_dir"] = str(cache)
    return tree


def run_faults(root: Path, tree: dict, **spec) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = root / "spec.json", root / "result.json"
    spec_path.write_text(json.dumps({"tree": tree, "root": str(root), **spec}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(RUNNER), str(spec_path), str(result_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(result_path.read_text())


@pytest.fixture(scope="module")
def setup(tiny_model_dir, pattern_data, tmp_path_factory):
    """The config tree, and the undisturbed run through the same runner."""
    base = tmp_path_factory.mktemp("faults")
    tree = _tree(tiny_model_dir, pattern_data, base / "token-cache")
    result = run_faults(base / "reference", tree, sequences=[[]])
    (ref,) = result["sequences"]
    assert [a["status"] for a in ref["attempts"]] == [0], ref["attempts"][-1]["stderr"]
    return tree, Path(ref["out"]), ref["attempts"][0]["ckpt_events"], base


def assert_same_run(out: Path, ref: Path) -> None:
    """Equal per-step losses and adapter tensors; nothing left behind but the run's own files."""
    assert train_losses(out) == train_losses(ref)
    adapter, ref_adapter = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (out, ref))
    assert adapter.keys() == ref_adapter.keys()
    assert all(torch.equal(adapter[k], ref_adapter[k]) for k in ref_adapter)
    left = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".") or "tmp" in p.name]
    left += [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".qlorakit-train.lock"]
    assert not left, left


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("qlorakit: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def test_kills_at_random_points_resume_bit_exact(setup):
    tree, ref, _, base = setup
    kinds = {"forward": [1, 4], "save": [1, 4], "rename": [1, 12], "metrics": [1, 6], "time": [0.05, 0.6]}
    result = run_faults(base / "random", tree, random={"seed": 14, "target_kills": KILLS, "per_sequence": 4,
                                                       "max_sequences": 12, "kinds": kinds})
    assert result["kills"] >= KILLS
    for seq in result["sequences"]:
        final = seq["attempts"][-1]
        assert final["status"] == 0, final["stderr"][-3000:]
        assert_same_run(Path(seq["out"]), ref)
    by_kind: dict[str, int] = {}
    for seq in result["sequences"]:
        for a in seq["attempts"]:
            if a["killed"]:
                by_kind[a["fault"]["kill"]] = by_kind.get(a["fault"]["kill"], 0) + 1
    FAULT_COUNTS["kill-and-resume runs, bit-exact"] = (
        f"{result['kills']} kills in {len(result['sequences'])} runs ("
        + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())) + ")")


def test_kills_inside_checkpoint_writes_resume_from_the_previous_checkpoint_bit_exact(setup):
    tree, ref, events, base = setup
    assert events and events >= 30  # 4 checkpoints (steps 2, 4, 6; one per save) of ~10 file operations each
    points = list(range(1, events + 1, max(1, events // CHECKPOINT_KILLS)))[:CHECKPOINT_KILLS]
    result = run_faults(base / "in-checkpoint", tree, sequences=[[{"kill": "ckpt", "at": k}] for k in points])
    kills = 0
    for seq in result["sequences"]:
        first, final = seq["attempts"][0], seq["attempts"][-1]
        kills += first["killed"]
        assert final["status"] == 0, final["stderr"][-3000:]
        assert_same_run(Path(seq["out"]), ref)
    assert kills == CHECKPOINT_KILLS
    FAULT_COUNTS["kills inside checkpoint writes, bit-exact"] = f"{kills} (file operation {points[0]} .. " \
                                                                f"{points[-1]} of {events})"


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def test_a_full_disk_stops_with_one_line_and_the_rerun_is_exact(setup):
    """A small tmpfs filled after the first checkpoint, where mounting is permitted (root); otherwise every write
    after it fails with ENOSPC through a hook. Either way: one line, and the rerun ends exact."""
    tree, ref, _, base = setup
    root = base / "full-disk"
    disk = root / "seq-0"  # the run's folder, seq-0/run; the runner's own files stay outside the small disk
    mounted = _mount_tmpfs(disk, "16m")
    fault = {"fill_disk_after_step": 2} if mounted else {"nospace_after_step": 2}
    try:
        result = run_faults(root, tree, sequences=[[fault]], finish=False)
        (seq,) = result["sequences"]
        (attempt,) = seq["attempts"]
        assert attempt["status"] == 2, attempt["stderr"][-3000:]
        line = _one_line_error(attempt["stderr"])
        assert "No space left on device" in line and str(disk) in line, line
        out = Path(seq["out"])
        (out / "filler").unlink(missing_ok=True)
        again = run_faults(root, tree, sequences=[[]])
        assert again["sequences"][0]["attempts"][-1]["status"] == 0
        assert_same_run(out, ref)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)
    how = "a 16 MiB tmpfs filled" if mounted else "ENOSPC from every write (write hook; no tmpfs here)"
    FAULT_COUNTS["full disk"] = f"{how} after checkpoint 2: {line[len('qlorakit: error: '):][:100]}"


def test_two_runs_on_one_output_dir(setup):
    tree, ref, _, base = setup
    result = run_faults(base / "two-runs", tree, concurrent=[{"slow": 0.3}, {}])
    first, second = result["concurrent"]["attempts"]
    assert first["status"] == 0, first["stderr"][-3000:]
    assert second["status"] == 2
    assert "another `qlorakit train` is writing to this output_dir" in _one_line_error(second["stderr"])
    out = Path(result["concurrent"]["out"])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == list(range(1, STEPS + 1))  # one run's lines, not interleaved
    assert_same_run(out, ref)
    FAULT_COUNTS["two runs on one output_dir"] = "the second refused in one line, the first exact"


def test_counts_include_the_in_process_damage_tests():
    from pipeline_helpers import CHECKPOINT_DAMAGE

    assert len(CHECKPOINT_DAMAGE) >= 6
    FAULT_COUNTS["kinds of file damage (tests/pipeline/test_pipeline_resume_guard.py)"] = \
        f"{len(CHECKPOINT_DAMAGE)}: " + ", ".join(CHECKPOINT_DAMAGE)
    FAULT_COUNTS["half-written metrics line"] = "killed mid-line ('metrics' kills above) and written by hand " \
        "(test_pipeline_resume_guard.py)"
