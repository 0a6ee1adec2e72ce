"""`--overwrite` of merge and quantize never deletes what the command did not write: it replaces only an empty
folder or a previous output of the same command (marked by qlorakit_output.json), never a folder that holds or
lies inside the base, the adapter or a training run, and a failure while writing leaves the old output intact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlorakit import cli
from qlorakit.adapters import merge as merge_module
from qlorakit.adapters.merge import merge_adapter
from qlorakit.errors import OutputFolderError
from qlorakit.model.output_folder import MARKER_NAME
from qlorakit.model.quantize_checkpoint import quantize_checkpoint


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`, by relative path."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def merge_cli(base: Path, adapter: Path, out: Path, *extra: str) -> int:
    return cli.main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), "--no-progress",
                     *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlorakit: error:") and "\n" not in err, err
    return err


@pytest.fixture()
def run_folder(tmp_path, adapter) -> Path:
    """A training run folder as `qlorakit train` leaves it: adapter, checkpoints, metrics, plot, config."""
    run = tmp_path / "runs" / "x"
    shutil.copytree(adapter, run / "adapter")
    shutil.copytree(adapter, run / "checkpoints" / "step-000002")
    (run / "checkpoints" / "latest").write_text("step-000002\n")
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 2.5}\n')
    (run / "loss.png").write_bytes(b"\x89PNG fake")
    (run / "config.yaml").write_text("model: {name: tiny}\n")
    return run


def test_base_models_parent_as_out_is_refused_and_every_file_kept(tiny_base, adapter, tmp_path, capsys):
    models = tmp_path / "models"
    base = models / "base"
    shutil.copytree(tiny_base, base)
    (models / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path)

    assert merge_cli(base, adapter, models, "--overwrite") == 2
    assert "holds the base model folder" in one_line_error(capsys)
    assert cli.main(["quantize", str(base), str(models), "--overwrite"]) == 2
    assert "holds the source model folder" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("adapter_inside", [True, False], ids=["its-adapter", "other-adapter"])
def test_run_folder_as_out_is_refused_and_every_file_kept(tiny_base, adapter, run_folder, tmp_path, capsys,
                                                          adapter_inside):
    before = snapshot(tmp_path)
    assert merge_cli(tiny_base, run_folder / "adapter" if adapter_inside else adapter, run_folder,
                     "--overwrite") == 2
    err = one_line_error(capsys)
    assert ("holds the adapter folder" if adapter_inside else "is a training run folder (it holds checkpoints)") in err
    assert cli.main(["quantize", str(tiny_base), str(run_folder), "--overwrite"]) == 2
    assert "is a training run folder" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


def test_out_inside_a_run_or_the_adapter_is_refused(tiny_base, run_folder, tmp_path, capsys):
    merged = merge_adapter(tiny_base, run_folder / "adapter", tmp_path / "merged", progress=False).out_dir
    inside_run = run_folder / "merged"
    shutil.copytree(merged, inside_run)  # a previous merge output, but inside a training run folder
    before = snapshot(tmp_path)
    assert merge_cli(tiny_base, run_folder / "adapter", inside_run, "--overwrite") == 2
    assert f"is inside the training run folder {run_folder.resolve()} (it holds checkpoints)" in one_line_error(capsys)
    assert merge_cli(tiny_base, run_folder / "adapter", run_folder / "adapter" / "merged") == 2
    assert "may not be the adapter folder or inside it" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


def test_remerge_over_a_previous_merge_output(tiny_base, adapter, adapter_b, tmp_path, capsys):
    out = tmp_path / "merged"
    merge_adapter(tiny_base, adapter, out, progress=False)
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["command"] == "merge" and "model.safetensors" in marker["files"] and marker["qlorakit_version"]

    assert merge_cli(tiny_base, adapter_b, out) == 2
    assert "already exists; pass --overwrite" in one_line_error(capsys)
    assert merge_cli(tiny_base, adapter_b, out, "--overwrite") == 0
    fresh = merge_adapter(tiny_base, adapter_b, tmp_path / "fresh", progress=False).out_dir
    assert snapshot(out) == snapshot(fresh)  # the same output as a merge into a new folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "merged"], "temporary folders left behind"


def test_empty_folder_may_be_replaced(tiny_base, adapter, tmp_path):
    (tmp_path / "out").mkdir()
    merge_adapter(tiny_base, adapter, tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["no-marker", "extra-file", "extra-folder", "quantize-output", "bad-marker"])
def test_folder_with_foreign_content_is_refused(tiny_base, adapter, tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "quantize-output":
        quantize_checkpoint(tiny_base, out)
    else:
        merge_adapter(tiny_base, adapter, out, progress=False)
    if case == "no-marker":
        (out / MARKER_NAME).unlink()
    elif case == "extra-file":
        (out / "notes.txt").write_text("mine")
    elif case == "extra-folder":
        (out / "eval").mkdir()
        (out / "eval" / "results.json").write_text("{}")
    elif case == "bad-marker":
        (out / MARKER_NAME).write_text("not json")
    before = snapshot(tmp_path)
    capsys.readouterr()

    assert merge_cli(tiny_base, adapter, out, "--overwrite") == 2
    err = one_line_error(capsys)
    expected = {
        "no-marker": f"holds files that qlorakit did not write (e.g. 'chat_template.jinja'; there is no {MARKER_NAME})",
        "extra-file": "holds 'notes.txt', which `qlorakit merge` did not write there",
        "extra-folder": "holds 'eval', which `qlorakit merge` did not write there",
        "quantize-output": "holds a `qlorakit quantize` output, not a `qlorakit merge` one",
        "bad-marker": f"its {MARKER_NAME} is not a readable qlorakit record",
    }[case]
    assert expected in err and "--overwrite replaces only an empty folder or a previous" in err
    assert snapshot(tmp_path) == before


def test_a_file_as_out_is_refused(tiny_base, adapter, tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputFolderError, match="exists and is not a plain folder"):
        merge_adapter(tiny_base, adapter, tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out").read_text() == "a file"


def test_failure_mid_write_leaves_the_old_output_intact(tiny_base, adapter, adapter_b, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    merge_adapter(tiny_base, adapter, out, progress=False)
    before = snapshot(tmp_path)
    real = merge_module.SafetensorsWriter.add
    calls = []

    def fail_midway(self, key, value):
        calls.append(key)
        if len(calls) == 5:
            raise OSError(28, "No space left on device (simulated)")
        return real(self, key, value)

    monkeypatch.setattr(merge_module.SafetensorsWriter, "add", fail_midway)
    with pytest.raises(OSError, match="simulated"):
        merge_adapter(tiny_base, adapter_b, out, overwrite=True, progress=False)
    assert snapshot(tmp_path) == before  # the old output, and no temporary folder


def test_swap_failure_puts_the_old_output_back(tiny_base, adapter, adapter_b, tmp_path, monkeypatch):
    import os

    out = tmp_path / "merged"
    merge_adapter(tiny_base, adapter, out, progress=False)
    before = snapshot(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in str(src):  # the new output's rename into place fails after the old one moved aside
            raise OSError(5, "I/O error (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        merge_adapter(tiny_base, adapter_b, out, overwrite=True, progress=False)
    assert snapshot(tmp_path) == before
