"""`qlorakit generate --no-quantize` runs a merged 16-bit folder as stored, so a merge can be checked in 16 bits:
its greedy reply is transformers' own greedy reply on that folder."""

from __future__ import annotations

import pytest
import torch

from qlorakit import cli
from qlorakit.adapters.merge import merge_adapter
from qlorakit.infer.session import load_for_inference
from qlorakit.nn.linear4bit import Linear4bit

PROMPT = "Name three colours."
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def merged(tiny_base, adapter, tmp_path_factory):
    return merge_adapter(tiny_base, adapter, tmp_path_factory.mktemp("merged") / "out", progress=False).out_dir


def transformers_greedy(folder) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def test_generate_no_quantize_equals_transformers_greedy(merged, capsys):
    expected = transformers_greedy(merged)
    assert expected.strip(), "the reply is empty: the comparison would be vacuous"
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(merged), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS),
                     "--no-quantize", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_no_quantize_keeps_the_stored_weights(merged):
    from transformers import AutoModelForCausalLM

    ours, _ = load_for_inference(str(merged), device="cpu", quantize=False, progress=False)
    assert not any(isinstance(m, Linear4bit) for m in ours.modules())
    theirs = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 123, 7, 250, 3, 64, 11]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)
    quantized, _ = load_for_inference(str(merged), device="cpu", progress=False)
    assert sum(isinstance(m, Linear4bit) for m in quantized.modules()) == 14  # the default still quantizes
