"""Mistakes on the command line and in the config file, and failures of the system underneath, answered by one
line on stderr (exit 2), never a traceback, and before any model is loaded where the arguments alone show them:
sampling values out of range, a device the machine lacks, a YAML key given twice, a config that is not UTF-8, and
any OSError (permission denied, disk full, a file where a folder should be) that escapes a command."""

from __future__ import annotations

import errno

import pytest
import torch
from pipeline_helpers import run_tree, write_yaml

from cli_helpers import one_error_line
from qlorakit import cli
from qlorakit.errors import DeviceError
from qlorakit.train.runtime import pick_runtime, resolve_device


@pytest.fixture
def no_base_load(monkeypatch):
    from qlorakit.model import loader

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loader, "load_model", refuse)


def missing_device() -> str:
    """A CUDA device this machine does not have."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


SAMPLING = {
    "--max-new-tokens -5": (["--max-new-tokens", "-5"], "--max-new-tokens -5: allowed an integer >= 1"),
    "--max-new-tokens 0": (["--max-new-tokens", "0"], "--max-new-tokens 0: allowed an integer >= 1"),
    "--temperature -1": (["--temperature", "-1"], "--temperature -1.0: allowed a finite number >= 0 (0: greedy)"),
    "--temperature nan": (["--temperature", "nan"], "--temperature nan: allowed a finite number >= 0"),
    "--temperature inf": (["--temperature", "inf"], "--temperature inf: allowed a finite number >= 0"),
    "--top-p 0": (["--top-p", "0"], "--top-p 0.0: allowed a number > 0 and <= 1"),
    "--top-p 1.5": (["--top-p", "1.5"], "--top-p 1.5: allowed a number > 0 and <= 1"),
}


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("case", list(SAMPLING))
def test_sampling_values_out_of_range_are_one_line(case, command, tiny_model_dir, capsys, no_base_load):
    args, words = SAMPLING[case]
    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert cli.main([command, "--model", str(tiny_model_dir), *prompt, "--device", "cpu", *args]) == 2
    assert words in one_error_line(capsys)


def test_train_max_new_tokens_below_1_is_one_line(tiny_model_dir, pattern_data, tmp_path, capsys, no_base_load):
    config = write_yaml(tmp_path / "run.yaml", run_tree(tiny_model_dir, pattern_data, tmp_path / "run"))
    assert cli.main(["train", str(config), "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0: allowed an integer >= 1" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_missing_device_is_one_line_before_loading(command, tiny_model_dir, capsys, no_base_load):
    device = missing_device()
    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert cli.main([command, "--model", str(tiny_model_dir), *prompt, "--device", device]) == 2
    line = one_error_line(capsys)
    assert f"--device {device}: not available" in line and "available here: cpu" in line


def test_unknown_device_name_is_one_line(tiny_model_dir, capsys, no_base_load):
    assert cli.main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--device", "gpu"]) == 2
    assert "--device 'gpu' is not a device name; available here: cpu" in one_error_line(capsys)


def test_training_runtime_refuses_a_missing_device():
    with pytest.raises(DeviceError, match=f"device {missing_device()}: not available.*available here: cpu"):
        pick_runtime("float32", "float32", missing_device())
    assert pick_runtime("float32", "float32", "cpu").device == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_yaml_key_given_twice_names_the_key_and_both_lines(tmp_path, capsys, no_base_load):
    config = tmp_path / "run.yaml"
    config.write_text("lora:\n  rank: 8\ntraining:\n  learning_rate: 1.0e-4\n  batch_size: 2\n"
                      "  learning_rate: 2.0e-4\n", encoding="utf-8")
    assert cli.main(["train", str(config)]) == 2
    assert one_error_line(capsys) == (f"qlorakit: error: {config}: key 'training.learning_rate' is given twice "
                                 "(lines 4 and 6); keep one")


def test_section_given_twice_is_refused_too(tmp_path, capsys, no_base_load):
    config = tmp_path / "run.yaml"
    config.write_text("lora:\n  rank: 8\nlora:\n  alpha: 16\n", encoding="utf-8")
    assert cli.main(["train", str(config)]) == 2
    assert "key 'lora' is given twice (lines 1 and 3)" in one_error_line(capsys)


def test_config_that_is_not_utf8_is_one_line(tmp_path, capsys, no_base_load):
    config = tmp_path / "run.yaml"
    text = "training:\n  output_dir: runs/café\n"
    config.write_bytes(text.encode("latin-1"))
    assert cli.main(["train", str(config)]) == 2
    line = one_error_line(capsys)
    assert str(config) in line and f"not UTF-8 text (byte 0xe9 at offset {text.index('é')})" in line


def test_output_dir_that_is_a_file_is_one_line(tiny_model_dir, pattern_data, tmp_path, capsys, no_base_load):
    taken = tmp_path / "run"
    taken.write_text("not a folder")
    config = write_yaml(tmp_path / "run.yaml", run_tree(tiny_model_dir, pattern_data, taken))
    assert cli.main(["train", str(config), "--no-progress"]) == 2
    assert str(taken) in one_error_line(capsys)


@pytest.mark.parametrize("error,line", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/out/adapter"), "/data/out/adapter: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/x.safetensors"),
     "/data/out/x.safetensors: No space left on device"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/train.jsonl"), "/data/train.jsonl: Is a directory"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "/a -> /b: Invalid cross-device link"),
    (OSError("something without an errno"), "something without an errno"),
], ids=["permission", "disk-full", "is-a-directory", "two-files", "no-errno"])
def test_os_errors_escaping_a_command_are_one_line(monkeypatch, capsys, error, line):
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_demo", fails)
    assert cli.main(["demo"]) == 2
    assert one_error_line(capsys) == f"qlorakit: error: {line}"
    with pytest.raises(type(error)):
        cli.main(["-v", "demo"])
