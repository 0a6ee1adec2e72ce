"""`lora.init: loftq` through `qlorakit train` on a tiny Llama that first learnt the toy pattern in 16 bits (a
random base has no knowledge for 4-bit quantization to lose, so it would not show the point):

- the run saves an adapter whose record says loftq and its calibration (the default: gram), its starting weights
  beside it, PEFT's plain `init_lora_weights: true`, and the rank-2r export for the 16-bit base; its first step's
  loss, on the same batch as the default-init run's, is lower (measured on this base: 16-bit 0.542, 4-bit + loftq
  0.550 calibrated, 0.574 with loftq_calibration none, 4-bit default 0.598);
- bad calibration settings, or calibration settings other than the defaults without lora.init loftq, are
  refused in one line; a dumped config (every key, the defaults too) validates again;
- a 4-bit model folder (no 16-bit W) is refused with one line naming lora.init;
- a resumed run loads the checkpoint's adapter and starting weights instead of initialising again, and ends
  exactly where the uninterrupted run ends; a default-init checkpoint is not resumed as a loftq run.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from pipeline_helpers import PATTERN, run_tree, save_tiny_model, train_losses
from safetensors.torch import load_file

from qlorakit.adapters.peft_format import INIT_NAME, lora_state_dict
from qlorakit.config import config_from_dict, dump_config
from qlorakit.errors import QloraConfigError, RunConflictError
from qlorakit.model import loftq_init
from qlorakit.model.quantize_checkpoint import quantize_checkpoint
from qlorakit.train.run import run_training

TEACH_STEPS = 12  # full fine-tuning steps on the pattern: enough that quantization costs a visible loss


@pytest.fixture(scope="module")
def taught_base(tmp_path_factory):
    """The pipeline tests' tiny Llama after 12 full-precision AdamW steps on the toy records (loss 0.78), saved
    in bf16 with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_model(tmp_path_factory.mktemp("taught"), "llama", seed=0)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    texts = [tok.apply_chat_template([{"role": "user", "content": f"Say it {i}."},
                                      {"role": "assistant", "content": PATTERN}], tokenize=False) for i in range(40)]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(TEACH_STEPS):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def _config(base, data, out, init: str, **training):
    return config_from_dict(run_tree(base, data, out, lora={"init": init}, training={"max_steps": 4, **training}))


@pytest.fixture(scope="module")
def loftq_run(taught_base, pattern_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("loftq-run") / "run"
    return out, run_training(_config(taught_base, pattern_data, out, "loftq"), progress=False)


def test_loftq_run_saves_its_init_and_starts_below_the_default_init_loss(taught_base, pattern_data, loftq_run,
                                                                        tmp_path):
    out, result = loftq_run
    default_out = tmp_path / "default"
    run_training(_config(taught_base, pattern_data, default_out, "default", max_steps=1), progress=False)
    first_loftq, first_default = train_losses(out)[1], train_losses(default_out)[1]
    assert first_loftq < first_default  # the same first batch: only the adapters' start differs

    adapter = result.adapter_dir
    record = json.loads((adapter / "qlorakit_adapter.json").read_text())
    assert record["lora_init"] == "loftq"
    calibration = record["loftq_calibration"]  # the default: the Gram of each linear's inputs, 2048 tokens at most
    assert (calibration["method"], calibration["damping"]) == ("gram", 0.01) and 0 < calibration["tokens"] <= 2048
    assert json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert (adapter / INIT_NAME).is_file() and not (default_out / "adapter" / INIT_NAME).exists()
    exported = json.loads((out / "adapter-16bit" / "adapter_config.json").read_text())
    assert (exported["r"], exported["lora_alpha"]) == (16, 32)


@pytest.mark.parametrize("lora, message", [
    ({"init": "loftq", "loftq_calibration": "full"}, "lora.loftq_calibration = 'full' is not allowed"),
    ({"init": "loftq", "loftq_calibration_tokens": 0}, "lora.loftq_calibration_tokens"),
    ({"loftq_calibration": "diagonal"}, "lora.loftq_calibration: for lora.init loftq only"),
    ({"loftq_calibration_tokens": 512}, "lora.loftq_calibration_tokens: for lora.init loftq only"),
])
def test_bad_calibration_settings_are_one_line(taught_base, pattern_data, tmp_path, lora, message):
    with pytest.raises(QloraConfigError, match=message) as err:
        config_from_dict(run_tree(taught_base, pattern_data, tmp_path / "run", lora=lora))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("init", ["default", "loftq"])
def test_a_dumped_config_validates_again(taught_base, pattern_data, tmp_path, init):
    """config.yaml in the output folder names every key, the calibration's defaults too (also without loftq)."""
    cfg = _config(taught_base, pattern_data, tmp_path / "run", init)
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_a_4bit_model_folder_is_refused_with_one_line(taught_base, pattern_data, tmp_path):
    four_bit = quantize_checkpoint(taught_base, tmp_path / "nf4")
    with pytest.raises(QloraConfigError, match="lora.init loftq needs the 16-bit weights") as err:
        run_training(_config(four_bit, pattern_data, tmp_path / "run", "loftq"), progress=False)
    assert "\n" not in str(err.value) and str(four_bit) in str(err.value)


def test_resume_loads_the_checkpoint_instead_of_initialising_again(taught_base, pattern_data, loftq_run, tmp_path,
                                                                   monkeypatch):
    ref_out, ref = loftq_run
    out = tmp_path / "run"
    cfg = _config(taught_base, pattern_data, out, "loftq")
    run_training(cfg, progress=False, stop_after_steps=2)
    assert (out / "checkpoints" / "step-000002" / INIT_NAME).is_file()

    def no_second_init(*args, **kwargs):
        raise AssertionError("a resumed run initialised its adapters again")

    monkeypatch.setattr(loftq_init, "loftq_initialize", no_second_init)
    second = run_training(cfg, progress=False)
    assert second.result.resumed_from == 2 and second.result.steps == 4
    assert train_losses(out) == train_losses(ref_out)
    got, want = lora_state_dict(second.model), lora_state_dict(ref.model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    got_init, want_init = load_file(out / "adapter" / INIT_NAME), load_file(ref_out / "adapter" / INIT_NAME)
    assert got_init.keys() == want_init.keys() and all(torch.equal(got_init[k], want_init[k]) for k in want_init)


def test_a_default_init_checkpoint_is_not_resumed_as_loftq(taught_base, pattern_data, tmp_path):
    out = tmp_path / "run"
    run_training(_config(taught_base, pattern_data, out, "default"), progress=False, stop_after_steps=1)
    with pytest.raises(RunConflictError, match="init loftq"):
        run_training(_config(taught_base, pattern_data, out, "loftq"), progress=False)


def test_a_default_run_in_the_same_folder_removes_the_earlier_16bit_export(taught_base, pattern_data, tmp_path):
    out = tmp_path / "run"
    run_training(_config(taught_base, pattern_data, out, "loftq", max_steps=1), progress=False)
    assert (out / "adapter-16bit").is_dir()
    run_training(_config(taught_base, pattern_data, out, "default", max_steps=1, resume=False), progress=False)
    assert not (out / "adapter-16bit").exists() and not (out / "adapter" / INIT_NAME).exists()
