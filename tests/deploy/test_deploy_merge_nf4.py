"""`qlorakit merge --quantize nf4`: the merged model written as a bitsandbytes 4-bit checkpoint is exactly what
`qlorakit quantize` makes of the 16-bit merge, and transformers + bitsandbytes load it on the CPU with the logits
of quantizing the 16-bit merge on load."""

from __future__ import annotations

import json

import pytest
import torch
from deploy_helpers import logits

from qlorakit import cli
from qlorakit.adapters.merge import merge_adapter
from qlorakit.model.quantize_checkpoint import quantize_checkpoint


@pytest.fixture(scope="module")
def merged_pair(tiny_base, adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("merged-nf4")
    dense = merge_adapter(tiny_base, adapter, root / "dense", progress=False).out_dir
    assert cli.main(["merge", "--model", str(tiny_base), "--adapter", str(adapter), "--out", str(root / "nf4"),
                     "--quantize", "nf4", "--no-progress"]) == 0
    return dense, root / "nf4"


def test_nf4_merge_equals_quantize_of_the_16bit_merge(merged_pair, tmp_path):
    from safetensors.torch import load_file

    dense, nf4 = merged_pair
    reference = quantize_checkpoint(dense, tmp_path / "ref")
    got, want = load_file(nf4 / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((nf4 / "config.json").read_text()) == json.loads((reference / "config.json").read_text())


def test_transformers_bitsandbytes_load_the_nf4_merge(merged_pair):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dense, nf4 = merged_pair
    # dtype "auto" (transformers 5's default) for both: the stored bf16, as the 4-bit states record it
    loaded = AutoModelForCausalLM.from_pretrained(nf4, device_map="cpu")
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)  # as config.json says
    on_load = AutoModelForCausalLM.from_pretrained(dense, quantization_config=bnb, device_map="cpu")
    assert torch.equal(logits(loaded), logits(on_load))
