"""What a rerun in an existing output_dir may and may not do (issue 14, findings 3 and 4).

- Settings that change the result (data, seed, learning rate, batch, sequence length, LoRA dropout, ...) are
  refused on resume with the list of differences, unless training.resume: force; harmless ones are logged.
- A finished run says so and trains nothing; a larger max_steps continues from its last checkpoint.
- A damaged checkpoint (any of its files changed, truncated, emptied, or trainer_state.json edited) is named and
  skipped for the newest intact one, and the run still ends bit for bit as the uninterrupted one; with no intact
  checkpoint the run is refused, naming the damage.
- One run at a time per output_dir (a lock); leftovers of killed checkpoint writes are removed at the next start;
  a half-written metrics line does not stop a rerun; the summary covers the whole run after a resume.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from pipeline_helpers import CHECKPOINT_DAMAGE, damage, read_events, run_tree, train_losses, write_pattern_data

from qlorakit.adapters.peft_format import lora_state_dict
from qlorakit.config import config_from_dict
from qlorakit.errors import CheckpointFormatError, RunConflictError
from qlorakit.train.checkpoint import latest_checkpoint
from qlorakit.train.run import run_training
from qlorakit.train.run_state import OutputLock

STEPS = 6


def _tree(model_dir, data, out, **training):
    return run_tree(model_dir, data, out, lora={"dropout": 0.1},
                    training={"max_steps": STEPS, "batch_size": 2, "learning_rate": 5e-3, "save_every": 2,
                              "eval_every": 3, **training})


def _config(model_dir, data, out, **training):
    return config_from_dict(_tree(model_dir, data, out, **training))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, pattern_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("guard-ref") / "run"
    result = run_training(_config(tiny_model_dir, pattern_data, out), progress=False)
    return out, lora_state_dict(result.model)


def _same_as_uninterrupted(out, model, uninterrupted) -> None:
    ref_dir, ref_adapter = uninterrupted
    assert train_losses(out) == train_losses(ref_dir)
    adapter = lora_state_dict(model)
    assert all(torch.equal(adapter[k], ref_adapter[k]) for k in ref_adapter)


@pytest.fixture()
def stopped_at_4(tiny_model_dir, pattern_data, tmp_path):
    """A run stopped after step 4: checkpoints step-2 and step-4 (keep_checkpoints 2)."""
    run = tmp_path / "run"
    first = run_training(_config(tiny_model_dir, pattern_data, run), progress=False, stop_after_steps=4)
    assert first.result.interrupted and latest_checkpoint(run).name == "step-000004"
    assert (run / "checkpoints" / "step-000002" / "manifest.json").is_file()
    return run


CHANGES = {
    "seed": {"seed": 7},
    "learning_rate": {"learning_rate": 1e-3},
    "max_seq_length": {"max_seq_length": 96},
    "batch_size": {"batch_size": 4},
}


@pytest.mark.parametrize("key", CHANGES)
def test_resume_with_a_result_changing_setting_is_refused(tiny_model_dir, pattern_data, stopped_at_4, key):
    cfg = _config(tiny_model_dir, pattern_data, stopped_at_4, **CHANGES[key])
    with pytest.raises(RunConflictError, match=f"{key}: ") as err:
        run_training(cfg, progress=False)
    assert "training.resume: force" in str(err.value) and "\n" not in str(err.value)
    assert latest_checkpoint(stopped_at_4).name == "step-000004"  # nothing was written


def test_resume_with_other_lora_dropout_or_data_is_refused(tiny_model_dir, pattern_data, stopped_at_4, tmp_path):
    tree = _tree(tiny_model_dir, pattern_data, stopped_at_4)
    tree["lora"]["dropout"] = 0.0
    with pytest.raises(RunConflictError, match="lora: 'r 8 alpha 16.0 dropout 0.1"):
        run_training(config_from_dict(tree), progress=False)
    other = write_pattern_data(tmp_path / "other.jsonl", n=30)
    tree = _tree(tiny_model_dir, other, stopped_at_4)
    with pytest.raises(RunConflictError, match="data_fingerprint"):
        run_training(config_from_dict(tree), progress=False)


def _as_legacy(run) -> None:
    """Rewrite run's checkpoints as qlorakit 0.1 wrote them: a settings_hash of six settings, no manifest."""
    import hashlib
    import json

    for ckpt in (run / "checkpoints").glob("step-*"):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        exact = state.pop("settings")["exact"]
        keys = ("seed", "batch_size", "gradient_accumulation", "max_seq_length", "packing", "learning_rate")
        blob = json.dumps({k: exact[k] for k in keys}, sort_keys=True)
        state["settings_hash"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=1))
        (ckpt / "manifest.json").unlink()


def test_checkpoints_of_qlorakit_0_1_are_compared_by_their_settings_hash(tiny_model_dir, pattern_data, stopped_at_4,
                                                                        uninterrupted, caplog):
    _as_legacy(stopped_at_4)
    with pytest.raises(RunConflictError, match="its settings_hash differs"):
        run_training(_config(tiny_model_dir, pattern_data, stopped_at_4, learning_rate=1e-3), progress=False)
    with caplog.at_level(logging.WARNING, logger="qlorakit.train"):
        out = run_training(_config(tiny_model_dir, pattern_data, stopped_at_4), progress=False)
    assert "before all settings were recorded; only six were compared" in caplog.text
    assert out.result.resumed_from == 4
    _same_as_uninterrupted(stopped_at_4, out.model, uninterrupted)


def test_force_resumes_despite_the_change_and_says_so(tiny_model_dir, pattern_data, stopped_at_4, caplog):
    cfg = _config(tiny_model_dir, pattern_data, stopped_at_4, learning_rate=1e-3, resume="force")
    with caplog.at_level(logging.WARNING, logger="qlorakit.train"):
        out = run_training(cfg, progress=False)
    assert out.result.resumed_from == 4 and out.result.steps == STEPS
    assert "despite changed settings" in caplog.text and "learning_rate: 0.005 -> 0.001" in caplog.text


def test_harmless_changes_are_logged_and_the_run_stays_exact(tiny_model_dir, pattern_data, stopped_at_4,
                                                             uninterrupted, caplog):
    cfg = _config(tiny_model_dir, pattern_data, stopped_at_4, eval_every=5, save_every=3, log_every=1)
    with caplog.at_level(logging.INFO, logger="qlorakit.train"):
        out = run_training(cfg, progress=False)
    assert out.result.resumed_from == 4
    assert "eval_every: 3 -> 5" in caplog.text and "save_every: 2 -> 3" in caplog.text
    _same_as_uninterrupted(stopped_at_4, out.model, uninterrupted)


def test_summary_after_resume_covers_the_whole_run(tiny_model_dir, pattern_data, stopped_at_4, uninterrupted):
    out = run_training(_config(tiny_model_dir, pattern_data, stopped_at_4), progress=False)
    ref = read_events(uninterrupted[0], "eval")
    assert [e["step"] for e in out.result.eval_history] == [r["step"] for r in ref] == [0, 3, 6]
    assert out.result.eval_history[0]["eval_loss"] == ref[0]["eval_loss"]
    assert out.result.losses == [train_losses(uninterrupted[0])[s] for s in range(1, STEPS + 1)]


def test_a_finished_run_says_so_and_trains_nothing(tiny_model_dir, pattern_data, tmp_path, capsys):
    from qlorakit import cli
    from pipeline_helpers import write_yaml

    run = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", _tree(tiny_model_dir, pattern_data, run))
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    adapter = run / "adapter" / "adapter_model.safetensors"
    before = (adapter.read_bytes(), adapter.stat().st_mtime_ns, (run / "metrics.jsonl").read_text())
    capsys.readouterr()
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    assert "already finished (6 of 6 steps)" in capsys.readouterr().out
    assert (adapter.read_bytes(), adapter.stat().st_mtime_ns, (run / "metrics.jsonl").read_text()) == before

    # A larger max_steps continues from the last step's checkpoint.
    longer = run_training(_config(tiny_model_dir, pattern_data, run, max_steps=8), progress=False)
    assert longer.result.resumed_from == STEPS and longer.result.steps == 8
    assert sorted(train_losses(run)) == list(range(1, 9))


@pytest.mark.parametrize("kind", CHECKPOINT_DAMAGE)
def test_damaged_latest_checkpoint_is_named_and_skipped(tiny_model_dir, pattern_data, stopped_at_4, uninterrupted,
                                                        kind, caplog):
    name, how = CHECKPOINT_DAMAGE[kind]
    damage(stopped_at_4 / "checkpoints" / "step-000004" / name, how)
    with caplog.at_level(logging.WARNING, logger="qlorakit.train"):
        out = run_training(_config(tiny_model_dir, pattern_data, stopped_at_4), progress=False)
    assert f"step-000004 is damaged ({name}:" in caplog.text
    assert out.result.resumed_from == 2
    _same_as_uninterrupted(stopped_at_4, out.model, uninterrupted)


def test_no_intact_checkpoint_is_refused_naming_the_damage(tiny_model_dir, pattern_data, stopped_at_4):
    for step in ("step-000002", "step-000004"):
        damage(stopped_at_4 / "checkpoints" / step / "optimizer.safetensors", "flip")
    with pytest.raises(CheckpointFormatError, match="no intact checkpoint.*optimizer.safetensors: contents differ"):
        run_training(_config(tiny_model_dir, pattern_data, stopped_at_4), progress=False)


def test_a_second_run_on_a_locked_output_dir_is_refused(tiny_model_dir, pattern_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = OutputLock(run)  # as another process's run holds it (flock conflicts between open files)
    try:
        with pytest.raises(RunConflictError, match=f"another `qlorakit train` is writing .*pid {os.getpid()}"):
            run_training(_config(tiny_model_dir, pattern_data, run), progress=False)
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    finally:
        lock.release()
    assert run_training(_config(tiny_model_dir, pattern_data, run, max_steps=2), progress=False).result.steps == 2


def test_leftovers_of_killed_writes_are_removed_and_a_torn_metrics_line_is_skipped(
        tiny_model_dir, pattern_data, stopped_at_4, uninterrupted, caplog):
    ckpts = stopped_at_4 / "checkpoints"
    shutil.copytree(ckpts / "step-000004", ckpts / f".step-000006.tmp-{os.getpid() + 1}")
    shutil.copytree(ckpts / "step-000002", ckpts / ".step-000004.old-12345")
    (ckpts / "step-000006").mkdir()  # a folder without a manifest: never renamed into place whole
    with (stopped_at_4 / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "step": 5, "lo')
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        out = run_training(_config(tiny_model_dir, pattern_data, stopped_at_4), progress=False)
    assert "removed 3 leftover(s)" in caplog.text
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000004", "step-000006"]
    _same_as_uninterrupted(stopped_at_4, out.model, uninterrupted)


def test_resume_false_starts_over_deleting_only_the_runs_own_checkpoints(tiny_model_dir, pattern_data, stopped_at_4,
                                                                         uninterrupted):
    """training.resume: false deletes this run's step folders, `latest` and write leftovers; a file of the user's
    in checkpoints/ (hidden or not) stays."""
    ckpts = stopped_at_4 / "checkpoints"
    (ckpts / "notes.txt").write_text("mine")
    (ckpts / ".mine").write_text("mine too")
    out = run_training(_config(tiny_model_dir, pattern_data, stopped_at_4, resume=False), progress=False)
    assert out.result.resumed_from == 0 and out.result.steps == STEPS
    assert (ckpts / "notes.txt").read_text() == "mine" and (ckpts / ".mine").read_text() == "mine too"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000004", "step-000006"]
    _same_as_uninterrupted(stopped_at_4, out.model, uninterrupted)
