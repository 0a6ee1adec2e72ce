"""What qlorakit's output folders say and carry for other tools and other users: adapter_config.json names a base
that PEFT can find (the hub id of the bundled default model), adapter folders honour the umask, and merge and
quantize carry a model's custom code only when asked to (and say what they left out)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from deploy_helpers import INPUT_IDS, logits
from pipeline_helpers import run_tree, write_pattern_data, write_yaml

from qlorakit import cli
from qlorakit.adapters.merge import merge_adapter
from qlorakit.adapters.peft_format import peft_base_name, save_adapter
from qlorakit.model.loader import load_model
from qlorakit.model.lora_inject import inject_lora
from qlorakit.model.quantize_checkpoint import quantize_checkpoint

CODE_FILES = ("configuration_tiny.py", "modeling_tiny.py", "tokenization_tiny.py", "tiny_helpers.py")
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def train(model_name: str, tmp_path: Path, steps: int = 3, **training) -> Path:
    """`qlorakit train` for a few steps on the toy data; returns the run folder."""
    data = write_pattern_data(tmp_path / "data.jsonl")
    tree = run_tree(Path(model_name), data, tmp_path / "run", training={"max_steps": steps, **training})
    tree["model"]["name"] = model_name
    assert cli.main(["train", str(write_yaml(tmp_path / "run.yaml", tree)), "--no-progress"]) == 0
    return tmp_path / "run"


def test_default_model_is_recorded_by_its_hub_id():
    assert peft_base_name("default") == HUB_ID
    assert peft_base_name("/models/llama-8b") == "/models/llama-8b"
    assert peft_base_name("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"


def test_training_on_default_records_the_hub_id_in_every_adapter(tiny_base, tmp_path, monkeypatch):
    import qlorakit.assets

    monkeypatch.setattr(qlorakit.assets, "default_model_dir", lambda: tiny_base)  # stands in for the cached model
    run = train("default", tmp_path, steps=2, save_every=1)
    configs = sorted(run.rglob("adapter_config.json"))
    assert len(configs) >= 2  # the final adapter and the checkpoints' adapters
    assert {json.loads(p.read_text())["base_model_name_or_path"] for p in configs} == {HUB_ID}
    sidecar = json.loads((run / "adapter" / "qlorakit_adapter.json").read_text())
    assert sidecar["base_model"] == "default" and sidecar["base_model_dir"] == str(tiny_base)


def test_auto_peft_model_finds_a_local_base(tiny_base, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    adapter = train(str(tiny_base), tmp_path) / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    plain = logits(base)
    reference = logits(PeftModel.from_pretrained(base, str(adapter)))
    assert (reference - plain).abs().max() > 1e-3  # the trained adapter changes the output
    assert torch.equal(logits(auto), reference)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_adapter_folder_and_files_honour_the_umask(tiny_base, tmp_path, umask):
    net, _ = load_model(tiny_base, load_in_4bit=False, compute_dtype=torch.float32, progress=False)
    inject_lora(net, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0)
    old = os.umask(umask)
    try:
        out = save_adapter(net, tmp_path / "adapter", base_model_name_or_path=str(tiny_base))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = sorted(out.iterdir())
    assert [p.name for p in files] == ["adapter_config.json", "adapter_model.safetensors", "qlorakit_adapter.json"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}


@pytest.fixture()
def custom_base(tiny_base, tmp_path) -> Path:
    """tiny_base plus custom code files (which fail if run) and auto_map entries pointing at them."""
    base = tmp_path / "custom-base"
    shutil.copytree(tiny_base, base)
    for name in CODE_FILES:
        (base / name).write_text("raise RuntimeError('custom code must not run')\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig",
                          "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    tok_config = json.loads((base / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]}
    (base / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return base


def _write(command: str, base: Path, adapter: Path, out: Path, *extra: str) -> None:
    if command == "merge":
        args = ["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), "--force",
                "--no-progress"]
    else:
        args = ["quantize", str(base), str(out)]
    assert cli.main([*args, *extra]) == 0


@pytest.mark.parametrize("command", ["merge", "quantize"])
def test_custom_code_is_left_out_unless_asked_and_the_log_says_so(custom_base, adapter, tmp_path, caplog, command):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        _write(command, custom_base, adapter, out)
    assert not list(out.glob("*.py"))
    config = json.loads((out / "config.json").read_text())
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and "auto_map" not in tok_config
    source_tok = json.loads((custom_base / "tokenizer_config.json").read_text())
    assert tok_config == {k: v for k, v in source_tok.items() if k != "auto_map"}
    said = [r.getMessage() for r in caplog.records if "left out of" in r.getMessage()]
    assert len(said) == 1
    assert said[0] == (f"qlorakit: left out of {out}: config.json's auto_map, configuration_tiny.py, modeling_tiny.py, "
                       "tiny_helpers.py, tokenization_tiny.py, tokenizer_config.json's auto_map; custom code is "
                       "carried over only with --trust-remote-code (trust_remote_code=True), and the output loads "
                       "with transformers' built-in classes")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # built-in classes: no custom code runs

    caplog.clear()
    kept = tmp_path / "kept"
    with caplog.at_level(logging.INFO):
        _write(command, custom_base, adapter, kept, "--trust-remote-code")
    for name in CODE_FILES:
        assert (kept / name).read_bytes() == (custom_base / name).read_bytes()
    assert json.loads((kept / "config.json").read_text())["auto_map"] == json.loads(
        (custom_base / "config.json").read_text())["auto_map"]
    assert (kept / "tokenizer_config.json").read_bytes() == (custom_base / "tokenizer_config.json").read_bytes()
    assert not [r for r in caplog.records if "left out of" in r.getMessage()]


def test_python_api_leaves_custom_code_out_by_default(custom_base, adapter, tmp_path):
    merged = merge_adapter(custom_base, adapter, tmp_path / "m", force=True, progress=False).out_dir
    quantized = quantize_checkpoint(custom_base, tmp_path / "q")
    assert not list(merged.glob("*.py")) and not list(quantized.glob("*.py"))


def test_loader_says_once_that_auto_map_is_not_run(custom_base, caplog):
    with caplog.at_level(logging.WARNING, logger="qlorakit.model"):
        model, _ = load_model(custom_base, compute_dtype=torch.float32, progress=False)
    said = [r.getMessage() for r in caplog.records if "auto_map" in r.getMessage()]
    assert said == [f"qlorakit: {custom_base}/config.json names custom code (auto_map), which is not run without "
                    "trust_remote_code (model.trust_remote_code: true); using transformers' built-in llama classes"]
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=INPUT_IDS).logits).all()
