"""`qlorakit quantize` writes what transformers + bitsandbytes write, and transformers + bitsandbytes load it.

For each source and quantization: the same tensor names, dtypes, shapes and bytes as the reference's
save_pretrained, the same quantization_config, and a plain from_pretrained(out) that gives exactly the logits
of transformers + bitsandbytes quantizing the source itself (same bytes in, same CPU kernels: torch.equal).
"""

from __future__ import annotations

import json
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from tiny_checkpoints import SIDE_FILES, cli_quant_args, quantization_config_of, read_tensors

from qlorakit import cli, kernels
from qlorakit.model.checkpoint_files import INDEX_FILE
from qlorakit.model.quantize_checkpoint import load_quantized_linears


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), name
        assert torch.equal(got, expected), name


def linear4bit_names(model: torch.nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def logits(model: torch.nn.Module) -> torch.Tensor:
    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize(
    ("kind", "quant"),
    [("llama", "nf4-dq"), ("llama", "fp4"), ("llama-sharded", "nf4-dq"), ("llama-tied", "nf4-dq"), ("gpt2", "fp4")],
)
def test_quantize_matches_transformers_bitsandbytes(source_dir, bnb_reference, tmp_path, kind, quant):
    from transformers import AutoModelForCausalLM

    src, out = source_dir(kind), tmp_path / "out"
    ref = bnb_reference(kind, quant)

    assert cli.main(["quantize", str(src), str(out), *cli_quant_args(quant)]) == 0

    assert_same_tensors(read_tensors(out), read_tensors(ref.folder))
    assert quantization_config_of(out) == quantization_config_of(ref.folder)
    ours_config = json.loads((out / "config.json").read_text())
    source_config = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in ours_config.items() if k != "quantization_config"} == source_config
    for name, text in SIDE_FILES.items():
        assert (out / name).read_text() == text
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    if kind == "llama-sharded":
        index = json.loads((out / INDEX_FILE).read_text())
        files = {p.name for p in out.glob("*.safetensors")}
        assert set(index["weight_map"].values()) == files == {p.name for p in src.glob("*.safetensors")}
        assert set(index["weight_map"]) == set(read_tensors(out))
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_tensors(out).values())
        assert index["metadata"] == json.loads((ref.folder / INDEX_FILE).read_text())["metadata"]
    else:
        assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
        assert not (out / INDEX_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "temporary folders left behind"

    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert linear4bit_names(loaded) == linear4bit_names(ref.model) == set(load_quantized_linears(out))
    assert torch.equal(logits(loaded), logits(ref.model))


def test_command_line_entry_point(source_dir, bnb_reference, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "qlorakit.cli", "quantize", str(source_dir("llama")), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert_same_tensors(read_tensors(out), read_tensors(bnb_reference("llama", "nf4-dq").folder))


def test_overwrite_replaces_only_a_previous_quantize_output(source_dir, tmp_path, capsys):
    src, out = source_dir("llama"), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    capsys.readouterr()

    for extra in ([], ["--overwrite"]):  # a folder with files quantize did not write is never replaced
        assert cli.main(["quantize", str(src), str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qlorakit: error:") and str(out) in err and "'keep.txt'" in err
        assert [p.name for p in out.iterdir()] == ["keep.txt"]

    previous = tmp_path / "previous"
    assert cli.main(["quantize", str(src), str(previous)]) == 0
    assert cli.main(["quantize", str(src), str(previous)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["quantize", str(src), str(previous), "--overwrite", "--quant-type", "fp4"]) == 0
    assert quantization_config_of(previous)["bnb_4bit_quant_type"] == "fp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "previous"], "temporary folders left behind"


def test_failure_while_writing_keeps_the_old_folder(source_dir, tmp_path, capsys, monkeypatch):
    from qlorakit.errors import QuantizationError

    src, out = source_dir("llama"), tmp_path / "out"
    assert cli.main(["quantize", str(src), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    calls = []

    def fail_on_third_call(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise QuantizationError("simulated failure in the middle of writing")
        return real_call(*args, **kwargs)

    real_call = kernels.call
    monkeypatch.setattr(kernels, "call", fail_on_third_call)
    assert cli.main(["quantize", str(src), str(out), "--overwrite", "--quant-type", "fp4"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "qlorakit: error: simulated failure in the middle of writing"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "temporary folders left behind"
