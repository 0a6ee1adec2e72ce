"""The commands as a user meets them: `qlorakit generate` with an adapter (refused on another base unless
--force), and every mistake a user can make in a training run answered by one line on stderr, exit code 2,
no traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from pipeline_helpers import run_tree, write_yaml

from cli_helpers import one_error_line
from qlorakit import cli
from qlorakit.train import loop
from qlorakit.train import loss as loss_module


def _generate(model_dir, adapter_dir, *extra: str) -> int:
    return cli.main(["generate", "--model", str(model_dir), "--adapter", str(adapter_dir), "--prompt", "hi",
                     "--max-new-tokens", "5", *extra])


def test_generate_with_the_trained_adapter(tiny_model_dir, trained_run, capsys):
    assert _generate(tiny_model_dir, trained_run.run_dir / "adapter") == 0
    assert "qlorakit: error" not in capsys.readouterr().err


def test_adapter_on_another_base_is_refused_unless_forced(other_base_dir, trained_run, capsys):
    adapter = trained_run.run_dir / "adapter"
    assert _generate(other_base_dir, adapter) == 2
    line = one_error_line(capsys)
    assert "trained on another base model" in line and "--force" in line
    assert _generate(other_base_dir, adapter, "--force") == 0


def _records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Each case: how to spoil a good run (YAML changes, --set overrides, or a data file), and words the error says.
USER_ERRORS = {
    "misspelt key in the YAML": (
        {"lora": {"rnak": 8}}, [], None, ["unknown key 'lora.rnak'", "did you mean 'rank'?"]),
    "misspelt key in --set": (
        {}, ["training.learnig_rate=1e-4"], None, ["unknown key 'training.learnig_rate'", "'learning_rate'"]),
    "unknown section": (
        {"trainig": {"seed": 1}}, [], None, ["unknown key 'trainig'", "did you mean 'training'?"]),
    "wrong type": (
        {}, ["training.batch_size=four"], None, ["training.batch_size", "valid integer", "'four'"]),
    "wrong choice": (
        {}, ["training.scheduler=cosin"], None, ["training.scheduler = 'cosin' is not allowed", "'cosine'"]),
    "missing model folder": (
        {}, ["model.name=/nonexistent/tiny-model"], None, ["/nonexistent/tiny-model", "folder not found"]),
    "missing data file": (
        {}, [], "missing", ["nope.jsonl", "data file not found"]),
    "records lacking the format's fields": (
        {}, [], [{"prompt": "hi", "response": "hello"}] * 4, ["record 0 has no 'instruction' field", "'prompt'"]),
    "empty dataset after filtering": (
        {}, [], [{"instruction": f"q{i}", "output": " "} for i in range(4)],
        ["no examples left after filtering", "4 with nothing to learn skipped"]),
    "every example longer than max_seq_length": (
        {}, ["training.max_seq_length=16"], None, ["every example is longer than max_seq_length 16"]),
    "kept activations without checkpointing": (
        {}, ["training.gradient_checkpointing=false", "training.keep_activations_gib=4"], None,
        ["keep_activations_gib needs gradient_checkpointing: true"]),
    "negative kept activations": (
        {}, ["training.keep_activations_gib=-1"], None, ["training.keep_activations_gib", "greater than or equal to 0"]),
    "unknown target module": (
        {}, ["lora.target_modules=[qkv_proj]"], None, ["lora.target_modules", "'qkv_proj'", "q_proj"]),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_error_is_one_line_exit_2(case, tiny_model_dir, pattern_data, tmp_path, capsys):
    sections, overrides, data, words = USER_ERRORS[case]
    if data == "missing":
        data_path = tmp_path / "nope.jsonl"
    elif data is not None:
        data_path = _records(tmp_path / "data.jsonl", data)
    else:
        data_path = pattern_data
    tree = run_tree(tiny_model_dir, data_path, tmp_path / "run")
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    config = write_yaml(tmp_path / "run.yaml", tree)
    args = ["train", str(config), "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    assert cli.main(args) == 2
    line = one_error_line(capsys)
    for word in words:
        assert word in line, line


@pytest.mark.parametrize("present", [[], ["config.json", "model.safetensors"]], ids=["empty", "no-tokenizer"])
def test_incomplete_model_folder_is_one_line_exit_2(present, tiny_model_dir, pattern_data, tmp_path, capsys):
    folder = tmp_path / "incomplete-model"
    folder.mkdir()
    for name in present:
        shutil.copy(tiny_model_dir / name, folder / name)
    config = write_yaml(tmp_path / "run.yaml", run_tree(folder, pattern_data, tmp_path / "run"))
    assert cli.main(["train", str(config), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert ("cannot load its tokenizer" if present else "not a Hugging Face model folder (no config.json)") in line


def test_nan_loss_stops_the_run_naming_the_step_and_causes(tiny_model_dir, pattern_data, tmp_path, monkeypatch,
                                                            capsys):
    real = loss_module.causal_lm_loss_sum
    calls = {"n": 0}

    def loss_nan_at_step_2(*args, **kwargs):
        loss = real(*args, **kwargs)
        if loss.requires_grad:  # a training step, not the eval before training
            calls["n"] += 1
            if calls["n"] == 2:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(loss_module, "causal_lm_loss_sum", loss_nan_at_step_2)
    config = write_yaml(tmp_path / "run.yaml", run_tree(tiny_model_dir, pattern_data, tmp_path / "run"))
    assert cli.main(["train", str(config), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "loss became nan at step 2" in line
    assert "training.learning_rate is 0.01" in line and "bad data" in line
    assert "fp16" not in line and "gradient clipping" not in line  # float32 compute, clipping on: not the causes
    assert not (tmp_path / "run" / "adapter").exists()


def test_nan_message_names_fp16_and_missing_clipping_when_they_apply(tmp_path):
    import torch

    from qlorakit.train.runtime import Runtime

    from qlorakit.config import config_from_dict

    cfg = config_from_dict({"training": {"output_dir": str(tmp_path), "learning_rate": 1e-3, "max_grad_norm": None}})
    settings = loop.LoopSettings.from_config(cfg)
    line = loop._divergence_message(7, float("inf"), Runtime(torch.device("cuda"), torch.float16, torch.float32),
                                    settings)
    assert line.startswith("loss became inf at step 7: training stopped.")
    assert "fp16 compute overflowing" in line and "set training.max_grad_norm" in line
