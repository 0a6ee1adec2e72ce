"""train/preflight.py: the checks `qlorakit train` runs before loading anything. An output folder that is a file,
lies under a file, cannot be created or is not writable, and a disk with less free space than the run writes,
are each one typed line naming the path; a missing folder is created."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections import namedtuple

import pytest

from qlorakit.errors import DiskSpaceError, OutputDirError
from qlorakit.train.preflight import (
    CHECKPOINT_OVERHEAD_BYTES,
    check_free_disk,
    check_output_dir,
    check_writable_dir,
    checkpoint_bytes,
    format_bytes,
    run_output_bytes,
)


def test_missing_output_dir_is_created_with_its_parents(tmp_path):
    out = tmp_path / "runs" / "a" / "b"
    assert check_output_dir(out) == out
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe leaves nothing behind


def test_existing_output_dir_is_kept_as_it_is(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert check_output_dir(tmp_path) == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_output_dir_that_is_a_file(tmp_path):
    taken = tmp_path / "run"
    taken.write_text("x")
    with pytest.raises(OutputDirError) as err:
        check_output_dir(taken)
    assert str(err.value) == (f"training.output_dir {taken}: is a file, not a folder; choose another "
                              "training.output_dir or move the file")


def test_output_dir_under_a_file_names_the_file(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match=f"lies under {blocker}, which is a file"):
        check_output_dir(blocker / "a" / "b", what="--out")
    assert blocker.is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputDirError, match="not writable .*Permission denied"):
            check_output_dir(ro)
        with pytest.raises(OutputDirError, match="cannot be created .*Permission denied"):
            check_output_dir(ro / "sub")
    finally:
        ro.chmod(0o700)


def test_unwritable_folder_as_the_system_reports_it(tmp_path, monkeypatch):
    """A read-only mount (or a folder root may not write) shows up only when a file is created; simulated here,
    since the tests may run as root, for whom permission bits do not stop writes."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputDirError) as err:
        check_writable_dir(tmp_path, "data.cache_dir")
    assert str(err.value) == (f"data.cache_dir {tmp_path}: not writable (Read-only file system); choose another "
                              "folder or fix its permissions")


Usage = namedtuple("Usage", "total used free")


def test_free_disk_refuses_with_need_and_free(tmp_path, monkeypatch):
    seen = []

    def usage(path):
        seen.append(path)
        return Usage(10 * 2**30, 9 * 2**30, 300 * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    missing = tmp_path / "not" / "yet"
    with pytest.raises(DiskSpaceError) as err:
        check_free_disk(missing, 3 * 2**30 // 2, "the run's checkpoints")
    assert str(err.value) == (f"{missing}: the run's checkpoints needs about 1.5 GiB and only 300.0 MiB is free on "
                              "that disk; free some space or choose a folder on another disk")
    assert seen == [tmp_path]  # a missing folder is measured at its closest existing ancestor
    assert check_free_disk(missing, 300 * 2**20, "x") == 300 * 2**20  # exactly enough is enough


def test_free_disk_of_a_real_folder(tmp_path):
    assert check_free_disk(tmp_path, 0, "nothing") >= 0
    with pytest.raises(DiskSpaceError, match="needs about .* and only .* is free"):
        check_free_disk(tmp_path, 2**62, "a huge run")


def test_checkpoint_size_estimates():
    n = 1_000_000
    assert checkpoint_bytes(n, 4, 32) == n * (4 + 8) + CHECKPOINT_OVERHEAD_BYTES
    assert checkpoint_bytes(n, 2, 8) == int(n * (2 + 2.25)) + CHECKPOINT_OVERHEAD_BYTES
    # two kept checkpoints, the third being written before the oldest goes, and the final adapter
    assert run_output_bytes(n, 4, 32, keep_checkpoints=2) == 3 * checkpoint_bytes(n, 4, 32) + 4 * n + 2**20
    with pytest.raises(ValueError, match="state_bits must be 8 or 32"):
        checkpoint_bytes(n, 4, 16)


def test_checkpoint_estimate_covers_a_real_checkpoint(tmp_path):
    """The estimate is an upper bound of what save_checkpoint writes for a LoRA model with 32-bit AdamW states."""
    import torch
    from torch import nn

    from qlorakit.model.lora_inject import inject_lora
    from qlorakit.optim.factory import build_optimizer
    from qlorakit.train.checkpoint import save_checkpoint

    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 48))
    inject_lora(model, ["proj"], r=8, alpha=16.0, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer("adamw_32bit", params, lr=1e-3, weight_decay=0.0)
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, model, optimizer, {"epoch": 0}, {}, None)
    written = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    trainable = sum(p.numel() for p in params)
    assert written <= checkpoint_bytes(trainable, 4, 32)


@pytest.mark.parametrize("n,text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (3 * 2**29, "1.5 GiB"),
                                    (5 * 2**40, "5.0 TiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_train_checks_output_dir_and_disk_before_loading_the_model(tiny_model_dir, pattern_data, tmp_path,
                                                                   monkeypatch):
    """`qlorakit train`: an output_dir that is a file, and a disk without room for the run's checkpoints (sized
    from the estimator's adapter bytes), are refused before anything loads."""
    from pipeline_helpers import run_tree

    from qlorakit.config import config_from_dict
    from qlorakit.model import loader
    from qlorakit.train.run import run_training

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the pre-flight refused")

    monkeypatch.setattr(loader, "load_model", no_load)
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    with pytest.raises(OutputDirError):
        run_training(config_from_dict(run_tree(tiny_model_dir, pattern_data, a_file)), progress=False)

    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(real_usage(p).total, real_usage(p).total, 1024))
    with pytest.raises(DiskSpaceError, match="3 checkpoints and the adapter needs about"):
        run_training(config_from_dict(run_tree(tiny_model_dir, pattern_data, tmp_path / "run")), progress=False)
