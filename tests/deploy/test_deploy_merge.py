"""`qlorakit merge`: the merged folder is the base with scaling * B @ A added to each adapted weight (fp32, one
rounding to the stored dtype); it loads in transformers and gives PEFT's base+adapter logits within bf16
tolerance; sharded bases keep their shards; bad inputs fail with one typed line."""

from __future__ import annotations

import json

import pytest
import torch
from deploy_helpers import logits, make_adapter, peft_logits

from qlorakit import cli
from qlorakit.adapters.merge import merge_adapter
from qlorakit.errors import AdapterMismatchError, CheckpointFormatError, QlorakitError


def _tensors(folder):
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def merged(tiny_base, adapter, tmp_path_factory):
    return merge_adapter(tiny_base, adapter, tmp_path_factory.mktemp("merged") / "out", progress=False).out_dir


def test_merged_weights_are_base_plus_scaled_update_rounded_once(tiny_base, adapter, merged):
    from safetensors import safe_open

    base, out = _tensors(tiny_base), _tensors(merged)
    assert out.keys() == base.keys()
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
    scaling = 16 / 8
    adapted = 0
    for name, w in base.items():
        a_key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if a_key in lora:
            b = lora[a_key.replace("lora_A", "lora_B")]
            expected = (w.float() + scaling * (b.float() @ lora[a_key].float())).to(w.dtype)
            adapted += 1
        else:
            expected = w
        assert out[name].dtype == w.dtype
        assert torch.equal(out[name], expected), name
    assert adapted == 2 * 7


def test_merged_model_matches_peft_logits_within_bf16_tolerance(tiny_base, adapter, merged):
    from transformers import AutoModelForCausalLM

    reference = peft_logits(tiny_base, adapter)
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32))
    got = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    assert (reference - base).abs().max() > 0.1  # the adapter changes the output
    scale = reference.abs().max()
    torch.testing.assert_close(got, reference, rtol=0, atol=float(2 ** -7 * scale * 4))


def test_side_files_are_copied(tiny_base, merged):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tiny_base / name).exists():
            assert (merged / name).read_bytes() == (tiny_base / name).read_bytes(), name
    assert json.loads((merged / "config.json").read_text()) == json.loads((tiny_base / "config.json").read_text())


def test_sharded_base_keeps_its_shards_and_index(sharded_base, adapter, tmp_path, merged):
    out = merge_adapter(sharded_base, adapter, tmp_path / "out", progress=False).out_dir
    src_index = json.loads((sharded_base / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == src_index["weight_map"]
    shards = sorted(p.name for p in sharded_base.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    single, sharded = _tensors(merged), _tensors(out)
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_existing_out_is_refused_unless_overwrite(tiny_base, adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(QlorakitError, match="already exists"):
        merge_adapter(tiny_base, adapter, out, progress=False)
    merge_adapter(tiny_base, adapter, out, overwrite=True, progress=False)
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_adapter_of_another_base_is_refused_unless_force(tiny_base, adapter, tmp_path):
    record = json.loads((adapter / "qlorakit_adapter.json").read_text())
    other = tmp_path / "adapter"
    other.mkdir()
    for p in adapter.iterdir():
        other.joinpath(p.name).write_bytes(p.read_bytes())
    (other / "qlorakit_adapter.json").write_text(json.dumps({**record, "base_fingerprint": "0" * 64}))
    with pytest.raises(AdapterMismatchError, match="another base model.*--force"):
        merge_adapter(tiny_base, other, tmp_path / "out", progress=False)
    merge_adapter(tiny_base, other, tmp_path / "out", force=True, progress=False)


def test_adapter_whose_shapes_do_not_fit_is_refused(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tiny_base, tmp_path / "adapter", seed=3, targets=["q_proj"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"has shape \[64, 64\], the adapter's update"):
        merge_adapter(tiny_base, adapter, tmp_path / "out", force=True, progress=False)


def test_4bit_base_is_refused_with_the_reason(tiny_base, adapter, tmp_path):
    from qlorakit.model.quantize_checkpoint import quantize_checkpoint

    nf4 = quantize_checkpoint(tiny_base, tmp_path / "nf4")
    with pytest.raises(QlorakitError, match="4-bit.*Merge into the 16-bit base instead.*--requantize"):
        merge_adapter(nf4, adapter, tmp_path / "out", progress=False)


def test_requantize_merges_into_4bit_base_and_reports_the_added_error(tiny_base, adapter, tmp_path):
    from qlorakit.model.quantize_checkpoint import load_quantized_linears, quantize_checkpoint

    nf4 = quantize_checkpoint(tiny_base, tmp_path / "nf4")
    report = merge_adapter(nf4, adapter, tmp_path / "out", requantize=True, progress=False)
    assert report.merged_linears == 14 and len(report.requantize_errors) == 14
    assert all(0 < e < 0.15 for e in report.requantize_errors.values())  # NF4 noise: ~0.1 relative
    assert "re-quantization added a relative Frobenius error" in report.line()
    linears = load_quantized_linears(report.out_dir)
    assert len(linears) == 14
    assert "quantization_config" in json.loads((report.out_dir / "config.json").read_text())


def test_cli_merge_and_one_line_errors(tiny_base, adapter, tmp_path, capsys):
    assert cli.main(["merge", "--model", str(tiny_base), "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                     "--no-progress"]) == 0
    assert "merged 14 linears" in capsys.readouterr().out
    assert cli.main(["merge", "--model", str(tmp_path / "nope"), "--adapter", str(adapter), "--out",
                     str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlorakit: error:") and "no such folder" in err and "\n" not in err
    assert cli.main(["merge", "--model", str(tiny_base), "--adapter", str(tmp_path / "none"), "--out",
                     str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "adapter folder not found" in err and "\n" not in err
