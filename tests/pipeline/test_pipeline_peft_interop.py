"""The adapter `qlorakit train` saves is a PEFT adapter: vLLM's rules hold for its config and tensors, and PEFT
applying it to the transformers model (16-bit, or 4-bit through bitsandbytes) gives qlorakit's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from qlorakit.adapters.peft_format import load_adapter
from qlorakit.infer.session import load_for_inference
from qlorakit.model.loader import load_model
from qlorakit.model.lora_inject import inject_lora

INPUT_IDS = torch.tensor([[5, 17, 42, 99, 123, 7, 250, 3, 64, 11], [300, 2, 2, 18, 77, 140, 9, 31, 6, 200]])


@pytest.fixture(scope="module")
def adapter_dir(trained_run):
    assert trained_run.exit_code == 0
    return trained_run.run_dir / "adapter"


def _pin_bitsandbytes_dequantize_path(model) -> None:
    """bitsandbytes has two CPU paths for a 4-bit linear: dequantize the weight and matmul (every CPU), and, on
    CPUs with AVX512-BF16 in eval mode without grad, a native kernel that repacks the weight and computes in bf16
    (0.03 off in these logits). The comparison is with the first path, the arithmetic qlorakit's reference does;
    pinning it makes the test mean the same on every CPU."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _peft_logits(base, adapter_dir) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    _pin_bitsandbytes_dequantize_path(model)
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def _logits(model) -> torch.Tensor:
    model.eval()
    _pin_bitsandbytes_dequantize_path(model)
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def test_saved_adapter_follows_vllm_rules(adapter_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    assert config["modules_to_save"] is None and config["use_dora"] is False and config["bias"] == "none"
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        b_norms = [f.get_tensor(k).norm() for k in keys if k.endswith(".lora_B.weight")]
    assert len(keys) == 2 * 7 * 2
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert all(norm > 0 for norm in b_norms), "training left a B matrix at zero: the logit checks would be vacuous"


def test_peft_on_bitsandbytes_4bit_base_matches_qlorakit_4bit(tiny_model_dir, adapter_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ours, _ = load_for_inference(str(tiny_model_dir), str(adapter_dir), device="cpu", compute_dtype=torch.float32,
                                 progress=False)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb, device_map="cpu",
                                                dtype=torch.float32)
    base_logits = _logits(base)
    theirs = _peft_logits(base, adapter_dir)
    got = _logits(ours)
    assert (theirs - base_logits).abs().max() > 0.1  # the adapter changes the output
    torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-5)  # the quantizers are bit-identical


def test_peft_on_16bit_base_matches_qlorakit_16bit(tiny_model_dir, adapter_dir):
    from transformers import AutoModelForCausalLM

    ours, _ = load_model(tiny_model_dir, load_in_4bit=False, compute_dtype=torch.float32, progress=False)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    inject_lora(ours, config["target_modules"], r=config["r"], alpha=config["lora_alpha"], dropout=0.0)
    load_adapter(ours, adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    theirs = _peft_logits(base, adapter_dir)
    torch.testing.assert_close(_logits(ours), theirs, rtol=1e-5, atol=1e-5)
