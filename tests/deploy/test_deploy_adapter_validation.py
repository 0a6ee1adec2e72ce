"""One adapter check for every command that reads an adapter (generate, chat, merge, serve): a broken adapter
folder is one CheckpointFormatError line naming the file, found before the base model is loaded where the
adapter alone shows it, and once the base's structure is known otherwise. The case that motivated it: an
adapter_config.json whose r disagrees with the weights' rank (a wrong alpha / r scale) was refused by generate
but merged and served."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import one_error_line
from qlorakit import cli
from qlorakit.adapters.peft_format import adapter_modules, check_adapter_fits, read_adapter
from qlorakit.errors import CheckpointFormatError
from qlorakit.infer.serve import AdapterServer


def _copy(adapter, tmp_path):
    out = tmp_path / "broken-adapter"
    shutil.copytree(adapter, out)
    return out


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return folder


def _rename_modules(folder, old: str, new: str):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k.replace(old, new): v for k, v in tensors.items()}, path)
    return folder


def _spoil_weights(folder, how: str):
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a header that is not JSON, with the file's length unchanged
        path.write_bytes(data[:8] + b"{" * 16 + data[24:])
    return folder


@pytest.fixture
def no_base_load(monkeypatch):
    """Fail the test if any command gets as far as loading a base model."""
    from qlorakit.model import loader

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the adapter was checked")

    monkeypatch.setattr(loader, "load_model", refuse)


def _generate(base, adapter) -> int:
    return cli.main(["generate", "--model", str(base), "--adapter", str(adapter), "--prompt", "hi",
                     "--max-new-tokens", "2", "--device", "cpu"])


def _merge(base, adapter, tmp_path) -> int:
    return cli.main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged"),
                     "--no-progress"])


def _serve(base, adapter) -> int:
    return cli.main(["serve", "--model", str(base), "--adapter", f"a={adapter}", "--port", "0", "--device", "cpu"])


# Broken before any base is needed: each command refuses before it loads the base.
ADAPTER_ONLY = {
    "config without r": (lambda d: _edit_config(d, r=None), ["adapter_config.json", "no 'r'"]),
    "config without lora_alpha": (lambda d: _edit_config(d, lora_alpha=None), ["no 'lora_alpha'"]),
    "config without target_modules": (lambda d: _edit_config(d, target_modules=None), ["no 'target_modules'"]),
    "r as a string": (lambda d: _edit_config(d, r="8"), ["r = '8'", "integer >= 1"]),
    "r below the weights' rank": (lambda d: _edit_config(d, r=4), ["r is 4", "lora_A [8, ", "alpha/r"]),
    "config not JSON": (lambda d: (d / "adapter_config.json").write_text("{r: 8"), ["not valid JSON"]),
    "config not an object": (lambda d: (d / "adapter_config.json").write_text("[8]"), ["JSON object, got list"]),
    "weights truncated": (lambda d: _spoil_weights(d, "truncated"), ["adapter_model.safetensors",
                                                                      "not a complete safetensors file"]),
    "weights empty": (lambda d: _spoil_weights(d, "empty"), ["adapter_model.safetensors", "the file is empty"]),
    "weights with a bad header": (lambda d: _spoil_weights(d, "header"), ["adapter_model.safetensors",
                                                                          "not a complete safetensors file"]),
    "an A without its B": (lambda d: _rename_modules(d, "q_proj.lora_B", "q_proj.lora_C"), ["is not a LoRA A/B"]),
}


@pytest.mark.parametrize("command", ["generate", "chat", "merge", "serve"])
@pytest.mark.parametrize("case", list(ADAPTER_ONLY))
def test_broken_adapter_is_one_line_before_the_base_loads(case, command, tiny_base, adapter, tmp_path, capsys,
                                                          no_base_load):
    spoil, words = ADAPTER_ONLY[case]
    broken = _copy(adapter, tmp_path)
    spoil(broken)
    run = {"generate": lambda: _generate(tiny_base, broken), "merge": lambda: _merge(tiny_base, broken, tmp_path),
           "serve": lambda: _serve(tiny_base, broken),
           "chat": lambda: cli.main(["chat", "--model", str(tiny_base), "--adapter", str(broken), "--device", "cpu"]),
           }[command]
    assert run() == 2
    line = one_error_line(capsys)
    assert str(broken) in line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "merged").exists()


def test_weights_of_rank_16_under_r_8_are_refused_everywhere(tiny_base, tmp_path, capsys, no_base_load):
    """The issue's case, built as it happens: PEFT saves a rank-16 adapter, then its config is edited to r=8."""
    from deploy_helpers import make_adapter

    broken = _edit_config(make_adapter(tiny_base, tmp_path / "r16", seed=4, r=16, targets=["q_proj"]), r=8)
    for run in (lambda: _generate(tiny_base, broken), lambda: _merge(tiny_base, broken, tmp_path),
                lambda: _serve(tiny_base, broken)):
        assert run() == 2
        assert "r is 8 but" in one_error_line(capsys)
    with pytest.raises(CheckpointFormatError, match="r is 8 but"):
        AdapterServer(str(tiny_base), {"a": broken}, device="cpu", progress=False)


def test_adapted_module_missing_from_the_base_is_refused_in_generate_and_serve(tiny_base, adapter, tmp_path,
                                                                                capsys):
    broken = _rename_modules(_copy(adapter, tmp_path), "layers.1.", "layers.7.")
    assert _generate(tiny_base, broken) == 2
    line = one_error_line(capsys)
    assert "adapts 'model.layers.7." in line and "this base model does not have" in line
    with pytest.raises(CheckpointFormatError, match="adapts 'model.layers.7.*does not have"):
        AdapterServer(str(tiny_base), {"a": broken}, device="cpu", progress=False)
    assert _merge(tiny_base, broken, tmp_path) == 2
    assert "model.layers.7." in one_error_line(capsys)


def test_target_module_name_missing_from_the_base_is_refused(tiny_base, adapter, tmp_path, capsys):
    config = json.loads((adapter / "adapter_config.json").read_text())
    broken = _edit_config(_copy(adapter, tmp_path), target_modules=[*config["target_modules"], "qkv_proj"])
    assert _generate(tiny_base, broken) == 2
    line = one_error_line(capsys)
    assert "target_modules names 'qkv_proj'" in line and "no module of this base model" in line


def test_adapted_module_of_another_shape_is_refused_by_the_structure_check(tiny_base, adapter):
    from transformers import AutoModelForCausalLM

    config, tensors, _ = read_adapter(adapter)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    modules = adapter_modules(tensors)
    check_adapter_fits(adapter, config, modules, model)  # the good adapter fits
    name = next(n for n in modules if n.endswith("q_proj"))
    a, b = modules[name]
    modules[name] = (torch.zeros(a.shape[0], a.shape[1] + 1), b)
    with pytest.raises(CheckpointFormatError, match=rf"{name} is \[64, 64\] in this base model.*\[64, 65\]"):
        check_adapter_fits(adapter, config, modules, model)


def test_nonfinite_weights_and_unsupported_options_are_refused(adapter, tmp_path):
    broken = _copy(adapter, tmp_path)
    path = broken / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(iter(sorted(tensors)))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(CheckpointFormatError, match="holds NaN or infinite values"):
        read_adapter(broken)
    unsupported = [({"rank_pattern": {"q_proj": 4}}, "rank_pattern"), ({"bias": "all"}, "bias = 'all'"),
                   ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                   ({"lora_alpha": float("inf")}, "lora_alpha = inf")]
    for i, (changes, words) in enumerate(unsupported):
        spoilt = _edit_config(_copy(adapter, tmp_path / str(i)), **changes)
        with pytest.raises(CheckpointFormatError, match=words):
            read_adapter(spoilt)
