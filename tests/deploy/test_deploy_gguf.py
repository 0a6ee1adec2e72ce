"""`qlorakit merge --gguf TYPE`: the merged model as one GGUF file. Read back with gguf.GGUFReader, matrices
round-trip exactly for f16/bf16 (q/k rows in GGUF's interleaved rotary order) and within Q8_0's error for q8_0;
transformers' GGUF loader rebuilds the model and tokenizer with the merged model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deploy_helpers import logits

from qlorakit.adapters.export_gguf import export_gguf, gguf_tensor_name, rotary_interleave
from qlorakit.adapters.merge import merge_adapter
from qlorakit.errors import QlorakitError

N_HEADS, N_KV = 4, 2


@pytest.fixture(scope="module")
def merged(tiny_base, adapter, tmp_path_factory):
    return merge_adapter(tiny_base, adapter, tmp_path_factory.mktemp("gguf") / "merged", gguf="f16",
                         progress=False)


def _merged_tensors(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _expected(hf_name: str, t: torch.Tensor) -> torch.Tensor:
    if ".q_proj." in hf_name:
        return rotary_interleave(t, N_HEADS)
    if ".k_proj." in hf_name:
        return rotary_interleave(t, N_KV)
    return t


def _read(path):
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def test_rotary_interleave_pairs_the_two_halves_of_each_head():
    w = torch.arange(8).reshape(8, 1)  # two heads of dim 4, halves [0, 1 | 2, 3] and [4, 5 | 6, 7]
    assert rotary_interleave(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("gguf_type", ["f16", "bf16"])
def test_f16_and_bf16_round_trip_exactly(merged, tmp_path, gguf_type):
    out = export_gguf(merged.out_dir, tmp_path / "m.gguf", gguf_type, progress=False)
    tensors, read = _merged_tensors(merged.out_dir), _read(out)
    assert len(read) == len(tensors)
    for hf_name, t in tensors.items():
        g = read[gguf_tensor_name(hf_name)]
        want = _expected(hf_name, t)
        if t.dim() == 1:
            got = torch.from_numpy(np.array(g.data)).reshape(t.shape)
            assert torch.equal(got, want.float()), hf_name
        elif gguf_type == "f16":
            got = torch.from_numpy(np.array(g.data)).reshape(t.shape)
            assert torch.equal(got, want.to(torch.float16)), hf_name
        else:
            got = torch.from_numpy(np.array(g.data).view(np.int16).copy()).view(torch.bfloat16).reshape(t.shape)
            assert torch.equal(got, want), hf_name


def test_q8_0_is_within_its_quantization_error(merged, tmp_path):
    from gguf import GGMLQuantizationType, dequantize

    out = export_gguf(merged.out_dir, tmp_path / "m.gguf", "q8_0", progress=False)
    tensors, read = _merged_tensors(merged.out_dir), _read(out)
    for hf_name, t in tensors.items():
        if t.dim() != 2:
            continue
        g = read[gguf_tensor_name(hf_name)]
        assert g.tensor_type == GGMLQuantizationType.Q8_0
        got = torch.from_numpy(dequantize(g.data, g.tensor_type)).reshape(t.shape)
        want = _expected(hf_name, t).float()
        # Q8_0: blocks of 32, step d = absmax / 127 stored in fp16; error <= d / 2 + 127 * (d's fp16 rounding)
        step = want.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
        assert ((got - want).reshape(-1, 32).abs() <= step * (0.5 + 127 * 2.0**-11) + 1e-7).all(), hf_name


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "bf16"])
def test_transformers_gguf_loader_gives_the_merged_logits(merged, tmp_path, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_gguf(merged.out_dir, tmp_path / f"m-{gguf_type}.gguf", gguf_type, progress=False)
    reference = logits(AutoModelForCausalLM.from_pretrained(merged.out_dir, dtype=torch.float32))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    tol = {"f16": 2e-2, "bf16": 1e-4, "q8_0": 0.1}[gguf_type] * float(reference.abs().max())
    torch.testing.assert_close(logits(loaded), reference, rtol=0, atol=tol)
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ours = AutoTokenizer.from_pretrained(merged.out_dir)
    text = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
    assert tok(text)["input_ids"] == ours(text)["input_ids"]
    assert tok.eos_token == ours.eos_token


def test_merge_writes_the_gguf_into_the_folder(merged):
    assert merged.gguf_file == merged.out_dir / "model-f16.gguf" and merged.gguf_file.is_file()


def test_other_architectures_are_refused(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(QlorakitError, match="GGUF export supports LlamaForCausalLM.*GPT2LMHeadModel"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "f16")


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral_export_load_in_transformers(arch, tmp_path):
    """Qwen2 (q/k/v biases, no rotary reordering) and Mistral (stored as GGUF `llama`, as llama.cpp does)."""
    from pipeline_helpers import save_tiny_model
    from transformers import AutoModelForCausalLM

    base = save_tiny_model(tmp_path / "base", arch, seed=3)
    (tmp_path / "gguf").mkdir()
    out = export_gguf(base, tmp_path / "gguf" / "m.gguf", "f16", progress=False)
    reference = logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    torch.testing.assert_close(logits(loaded), reference, rtol=0, atol=2e-2 * float(reference.abs().max()))


def test_cli_merge_gguf_q8_0(tiny_base, adapter, tmp_path, capsys):
    from qlorakit import cli

    out = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(tiny_base), "--adapter", str(adapter), "--out", str(out),
                     "--gguf", "q8_0", "--no-progress"]) == 0
    assert f"GGUF: {out / 'model-q8_0.gguf'}" in capsys.readouterr().out
    assert len(_read(out / "model-q8_0.gguf")) == 2 * 9 + 3
    assert cli.main(["merge", "--model", str(tiny_base), "--adapter", str(adapter), "--out", str(tmp_path / "x"),
                     "--gguf", "f16", "--quantize", "nf4"]) == 2
    assert "leave out --quantize" in capsys.readouterr().err
