"""qlorakit loads folders already in bitsandbytes' 4-bit format (its own `qlorakit quantize` output, and what
transformers + bitsandbytes `save_pretrained` write) from the stored packed weights, without quantizing again:
the model equals quantizing the 16-bit source on load bit for bit, and `train` and `generate` run on it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))

from pipeline_helpers import one_thread, run_tree, save_tiny_model, train_losses, write_pattern_data  # noqa: E402
from pipeline_helpers import write_yaml  # noqa: E402
from tiny_checkpoints import QUANTS  # noqa: E402

from qlorakit import cli  # noqa: E402
from qlorakit.errors import QlorakitError  # noqa: E402
from qlorakit.model.loader import load_model  # noqa: E402
from qlorakit.model.quantize_checkpoint import load_quantized_linears, quantize_checkpoint  # noqa: E402
from qlorakit.nn.linear4bit import Linear4bit  # noqa: E402

INPUT_IDS = torch.tensor([[5, 17, 42, 99, 123, 7, 250, 3, 64, 11], [30, 2, 2, 18, 77, 140, 9, 31, 6, 200]])


@pytest.fixture(scope="module", autouse=True)
def single_threaded_module():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory) -> Path:
    """The pipeline tests' tiny Llama (bf16 weights, ChatML tokenizer)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny16"), "llama", seed=0)


@pytest.fixture(scope="module")
def tiny_nf4(tiny16, tmp_path_factory) -> Path:
    return quantize_checkpoint(tiny16, tmp_path_factory.mktemp("q") / "tiny-nf4")


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def load(folder: Path, **quant) -> tuple[torch.nn.Module, object]:
    return load_model(folder, compute_dtype=quant.pop("compute_dtype", torch.float32), progress=False, **quant)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_own_quantize_output_equals_quantizing_on_load(tiny16, tiny_nf4, compute_dtype):
    pre, report = load(tiny_nf4, compute_dtype=compute_dtype)
    fresh, fresh_report = load(tiny16, compute_dtype=compute_dtype)
    assert report.prequantized and not fresh_report.prequantized
    assert report.quantized_linears == fresh_report.quantized_linears == 14
    assert "read pre-quantized" in report.line()
    stored = load_quantized_linears(tiny_nf4)
    for name, module in pre.named_modules():
        if isinstance(module, Linear4bit):
            assert torch.equal(module.weight, stored[name].weight), name  # the stored bytes, not re-quantized
            assert module.dtype == compute_dtype
    assert torch.equal(logits(pre), logits(fresh))


@pytest.mark.parametrize(
    ("kind", "quant"), [("llama", "nf4-dq"), ("llama", "fp4"), ("llama-sharded", "nf4-dq"), ("gpt2", "nf4-dq")]
)
def test_transformers_bitsandbytes_folder_equals_quantizing_on_load(source_dir, bnb_reference, kind, quant):
    q = QUANTS[quant]
    settings = {"quant_type": q["quant_type"], "double_quant": q["double_quant"]}
    pre, report = load(bnb_reference(kind, quant).folder, **settings)
    fresh, _ = load(source_dir(kind), **settings)
    assert report.prequantized and report.quantized_linears > 0
    ids = INPUT_IDS.remainder(256)
    with torch.no_grad():
        assert torch.equal(pre(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_transformers_bitsandbytes_folder_gives_bitsandbytes_logits(tiny16, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tiny16, quantization_config=config, device_map="cpu",
                                                  dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "bnb")
    # On a CPU with AVX512-BF16/AMX, bitsandbytes' Linear4bit in eval mode repacks its weight for a native CPU
    # kernel; switch that off so the reference is its dequantize + matmul path on every CPU.
    layers = [m for m in theirs.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    for m in layers:
        m.support_avx512bf16_for_cpu = False

    ours, report = load(tmp_path / "bnb")
    assert report.prequantized and report.quantized_linears == 14
    assert torch.equal(logits(ours), logits(load(tiny16)[0]))
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_linears_the_folder_keeps_in_16_bits_stay_16_bit(tiny16, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=["v_proj", "lm_head"])
    theirs = AutoModelForCausalLM.from_pretrained(tiny16, quantization_config=config, device_map="cpu",
                                                  dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "bnb")
    for m in theirs.modules():  # their dequantize + matmul path on every CPU (see the test above)
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False

    ours, report = load(tmp_path / "bnb")
    kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in ours.named_modules() if name.endswith("_proj")}
    assert kinds["v_proj"] is torch.nn.Linear and kinds["q_proj"] is Linear4bit
    assert report.quantized_linears == 12 and "(2 more stored in 16 bits stay 16-bit)" in report.line()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_other_requested_settings_are_said_in_one_line_and_the_folders_used(tiny_nf4, caplog):
    with caplog.at_level(logging.WARNING, logger="qlorakit.model"):
        model, _ = load(tiny_nf4, quant_type="fp4", blocksize=128)
    lines = [r.getMessage() for r in caplog.records if "the config asks for" in r.getMessage()]
    assert lines == [f"qlorakit: {tiny_nf4} stores its 4-bit linears as nf4, blocksize 64, double quantization on, "
                     "the config asks for fp4, blocksize 128, double quantization on: using the folder's (quantize "
                     "its 16-bit checkpoint to get the config's)"]
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.quant_type == "nf4" and m.blocksize == 64 for m in layers)


def test_train_and_generate_on_the_quantized_folder(tiny16, tiny_nf4, tmp_path, capsys):
    data = write_pattern_data(tmp_path / "data.jsonl")
    runs = {}
    for name, model_dir in (("nf4", tiny_nf4), ("16bit", tiny16)):
        tree = run_tree(model_dir, data, tmp_path / name, training={"max_steps": 2})
        assert cli.main(["train", str(write_yaml(tmp_path / f"{name}.yaml", tree)), "--no-progress"]) == 0
        runs[name] = train_losses(tmp_path / name)
    assert len(runs["nf4"]) == 2
    assert runs["nf4"] == runs["16bit"]  # the same 4-bit base either way, so the same loss curve
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(tiny_nf4), "--adapter", str(tmp_path / "nf4" / "adapter"),
                     "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    assert "qlorakit: error" not in capsys.readouterr().err


def test_4bit_folder_is_refused_in_16_bits_in_one_line(tiny_nf4, capsys):
    with pytest.raises(QlorakitError, match="holds bitsandbytes 4-bit weights, which load only in 4 bits"):
        load(tiny_nf4, load_in_4bit=False)
    assert cli.main(["generate", "--model", str(tiny_nf4), "--prompt", "hi", "--no-quantize"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("qlorakit: error:") and "leave out --no-quantize" in err


def test_other_quantization_methods_are_refused(tiny16, tmp_path):
    import json
    import shutil

    folder = tmp_path / "int8"
    shutil.copytree(tiny16, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QlorakitError, match="quantization_config is 'bitsandbytes' 8-bit; qlorakit loads"):
        load(folder)
