"""Bad input to `qlorakit quantize`: exit code 2, one line on stderr naming the path or key, no traceback, and
nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlorakit import cli
from qlorakit.model.checkpoint_files import INDEX_FILE


def copy_source(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_failing(capsys, tmp_path: Path, src: Path, *extra: str) -> str:
    """Run the command, check the failure contract, return the one stderr line."""
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    capsys.readouterr()  # drop what building the fixtures printed
    assert cli.main(["quantize", str(src), str(out), *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("qlorakit: error: ")
    assert "Traceback" not in captured.err and captured.out == ""
    assert set(tmp_path.iterdir()) == before, "the failed run left files behind"
    return lines[0]


def test_missing_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    line = run_failing(capsys, tmp_path, missing)
    assert str(missing) in line and "no such folder" in line


def test_folder_without_config_json(tmp_path, capsys, source_dir):
    src = copy_source(source_dir("llama"), tmp_path / "src")
    (src / "config.json").unlink()
    line = run_failing(capsys, tmp_path, src)
    assert str(src) in line and "config.json" in line


def test_pickle_weights_are_not_loaded(tmp_path, capsys, source_dir):
    src = copy_source(source_dir("llama"), tmp_path / "src")
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    line = run_failing(capsys, tmp_path, src)
    assert str(src) in line and "model.safetensors" in line
    assert "pytorch_model.bin" in line and "not loaded, for safety" in line


def test_tensor_named_in_index_but_missing(tmp_path, capsys, source_dir):
    src = copy_source(source_dir("llama-sharded"), tmp_path / "src")
    index = json.loads((src / INDEX_FILE).read_text())
    shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index["weight_map"]["model.layers.1.mlp.extra_proj.weight"] = shard
    (src / INDEX_FILE).write_text(json.dumps(index))
    line = run_failing(capsys, tmp_path, src)
    assert shard in line and "'model.layers.1.mlp.extra_proj.weight'" in line and INDEX_FILE in line


def test_file_named_in_index_but_missing(tmp_path, capsys, source_dir):
    src = copy_source(source_dir("llama-sharded"), tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    line = run_failing(capsys, tmp_path, src)
    assert INDEX_FILE in line and shard.name in line


@pytest.mark.parametrize("model_type", ["no-such-model", "t5"])  # unknown to transformers / not a causal LM
def test_unknown_architecture(tmp_path, capsys, source_dir, model_type):
    src = copy_source(source_dir("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type=model_type, architectures=["NoSuchModelForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    line = run_failing(capsys, tmp_path, src)
    assert str(src / "config.json") in line and model_type in line


def test_weights_that_do_not_fit_the_architecture(tmp_path, capsys, source_dir):
    src = copy_source(source_dir("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(config))
    line = run_failing(capsys, tmp_path, src)
    assert str(src / "model.safetensors") in line and "mlp.gate_proj.weight" in line and "[96, 64]" in line


def test_already_quantized_source(tmp_path, capsys, bnb_reference):
    src = bnb_reference("llama", "nf4-dq").folder
    line = run_failing(capsys, tmp_path, src)
    assert str(src / "config.json") in line and "already has a quantization_config" in line


@pytest.mark.parametrize(
    ("args", "expected"), [(["--blocksize", "48"], "blocksize 48"), (["--blocksize", "8192"], "blocksize 8192")]
)
def test_invalid_blocksize(tmp_path, capsys, source_dir, args, expected):
    line = run_failing(capsys, tmp_path, source_dir("llama"), *args)
    assert expected in line and "power of two" in line
