"""The flags of `qlorakit quantize`, `generate`, `chat`, `serve`, `pairs`, `inspect` and `eval` are generated from one pydantic model per
command (options/): each command's flags are exactly its model's fields, with the model's defaults and choices;
a value a field does not allow is one line naming the flag, before the command runs, from the command line and
from Python alike; `quantize`'s 4-bit settings are the training config's own."""

from __future__ import annotations

import argparse
import inspect
import logging

import pytest

from cli_helpers import one_error_line
from qlorakit import cli
from qlorakit.config import QloraConfig, QuantizationSection, config_from_dict
from qlorakit.errors import OptionValueError, QloraConfigError
from qlorakit.options import (ChatOptions, CommandOptions, EvalOptions, GenerateOptions, InspectOptions,
                              PairsOptions, QuantizeOptions, ServeOptions, add_flags, read_flags)
from qlorakit.options.base import flag, is_switch_off, option

COMMANDS = {"quantize": QuantizeOptions, "generate": GenerateOptions, "chat": ChatOptions, "serve": ServeOptions,
            "pairs": PairsOptions, "inspect": InspectOptions, "eval": EvalOptions}
REQUIRED = {"quantize": ["src", "dst"], "generate": ["--prompt", "hi"], "chat": [], "serve": [],
            "pairs": ["--out", "pairs.jsonl"], "inspect": ["model"], "eval": ["--model", "m"]}


def subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def arguments(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_flags_are_exactly_the_fields_of_the_model(command):
    model = COMMANDS[command]
    actions = arguments(subparser(command))
    assert list(actions) == list(model.model_fields)  # same names, same order: nothing added by hand
    for name, field in model.model_fields.items():
        action = actions[name]
        spelt = action.option_strings or [action.dest]
        assert spelt == [flag(name, field)]
        if isinstance(action, argparse._StoreFalseAction):
            assert is_switch_off(field) and spelt[0] == "--no-" + name.replace("_", "-")
        literal = getattr(field.annotation, "__args__", None)
        if action.choices is not None:
            assert tuple(action.choices) == literal
        assert action.required == field.is_required()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_parsed_defaults_are_the_models(command):
    model = COMMANDS[command]
    args = cli.build_parser().parse_args([command, *REQUIRED[command]])
    for name, field in model.model_fields.items():
        if not field.is_required():
            assert getattr(args, name) == field.default, name
    assert args.options is model
    opts = read_flags(model, args)
    assert isinstance(opts, model)
    assert opts == model(**{n: getattr(args, n) for n in model.model_fields if model.model_fields[n].is_required()})


def test_every_flag_reaches_its_field():
    args = cli.build_parser().parse_args(
        ["generate", "--prompt", "a", "--prompt", "b", "--model", "m", "--adapter", "ad", "--force",
         "--max-new-tokens", "7", "--temperature", "0.5", "--top-p", "0.9", "--repetition-penalty", "1.2",
         "--no-chat-template", "--device", "cpu", "--no-quantize"])
    assert read_flags(GenerateOptions, args).model_dump() == {
        "model": "m", "adapter": "ad", "force": True, "max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "repetition_penalty": 1.2, "chat_template": False, "device": "cpu", "quantize": False, "prompt": ["a", "b"]}
    args = cli.build_parser().parse_args(["serve", "--adapter", "a=x", "--adapter", "b=y", "--port", "0",
                                          "--max-batch", "4", "--batch-window-ms", "0"])
    opts = read_flags(ServeOptions, args)
    assert (opts.adapter, opts.port, opts.max_batch, opts.batch_window_ms) == (["a=x", "b=y"], 0, 4, 0.0)
    args = cli.build_parser().parse_args(["quantize", "src", "dst", "--quant-type", "fp4", "--blocksize", "128",
                                          "--no-double-quant", "--compute-dtype", "float16"])
    opts = read_flags(QuantizeOptions, args)
    assert (opts.quant_type, opts.blocksize, opts.double_quant, opts.compute_dtype) == ("fp4", 128, False, "float16")


def test_a_new_field_is_a_new_flag():
    class Probe(CommandOptions):
        rows: int = option(3, "how many", ge=1)
        verbose_log: bool = option(True, "log each row", off="log nothing")
        mode: str = option("a", "which")

    parser = argparse.ArgumentParser()
    add_flags(parser, Probe)
    assert read_flags(Probe, parser.parse_args(["--rows", "5", "--no-verbose-log"])) == Probe(rows=5,
                                                                                              verbose_log=False)
    assert "how many (an integer >= 1; default: 3)" in parser.format_help()


BAD = [
    ("generate", ["--max-new-tokens", "0"], "--max-new-tokens 0: allowed an integer >= 1"),
    ("generate", ["--max-new-tokens", "ten"], "--max-new-tokens 'ten': allowed an integer >= 1"),
    ("chat", ["--temperature", "inf"], "--temperature inf: allowed a finite number >= 0 (0: greedy)"),
    ("chat", ["--top-p", "2"], "--top-p 2.0: allowed a number > 0 and <= 1"),
    ("generate", ["--repetition-penalty", "0"], "--repetition-penalty 0.0: allowed a finite number > 0 (1: off)"),
    ("serve", ["--port", "70000"], "--port 70000: allowed 0 to 65535 (0: any free port)"),
    ("serve", ["--max-batch", "65"], "--max-batch 65: allowed 1 to 64"),
    ("serve", ["--batch-window-ms", "nan"], "--batch-window-ms nan: allowed a finite number >= 0"),
    ("quantize", ["--blocksize", "48"], "--blocksize 48: must be a power of two from 32 to 4096"),
    ("eval", ["--batch-size", "0"], "--batch-size 0: allowed an integer >= 1"),
    ("eval", ["--max-seq-length", "8"], "--max-seq-length 8: allowed an integer >= 16"),
]


@pytest.mark.parametrize(("command", "args", "words"), BAD, ids=[" ".join(a) for _, a, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_flag_before_the_command_runs(command, args, words, capsys, monkeypatch):
    for name in ("_cmd_quantize", "_cmd_generate", "_cmd_chat", "_cmd_serve", "_cmd_eval"):
        monkeypatch.setattr(cli, name, lambda opts: pytest.fail("the command ran with a bad option"))
    assert cli.main([command, *REQUIRED[command], *args]) == 2
    assert one_error_line(capsys) == f"qlorakit: error: {words}"


def test_python_callers_get_the_same_line():
    with pytest.raises(OptionValueError) as err:
        GenerateOptions(prompt=["hi"], max_new_tokens=0)
    assert str(err.value) == "--max-new-tokens 0: allowed an integer >= 1"
    with pytest.raises(OptionValueError, match=r"unknown option 'max_batchs'; did you mean 'max_batch'\?"):
        ServeOptions(max_batchs=4)
    with pytest.raises(OptionValueError, match="^--prompt: required$"):
        GenerateOptions()
    with pytest.raises(OptionValueError, match="--no-quantize 1: allowed true or false"):
        GenerateOptions(prompt=["hi"], quantize=1)  # no silent 1 -> True
    with pytest.raises(Exception, match="frozen"):
        GenerateOptions(prompt=["hi"]).max_new_tokens = 0  # type: ignore[misc]


def test_quantize_takes_the_training_configs_quantization_settings():
    section = QuantizationSection.model_fields
    for name in ("quant_type", "blocksize", "double_quant", "compute_dtype"):
        mine = QuantizeOptions.model_fields[name]
        assert (mine.annotation, mine.default, mine.description) == (
            section[name].annotation, section[name].default, section[name].description)
    with pytest.raises(QloraConfigError, match="quantization.blocksize: must be a power of two from 32 to 4096"):
        config_from_dict({"quantization": {"blocksize": 48}})
    with pytest.raises(OptionValueError, match="--blocksize 48: must be a power of two from 32 to 4096"):
        QuantizeOptions(model_dir="a", out_dir="b", blocksize=48)
    assert QuantizeOptions(model_dir="a", out_dir="b").blocksize == QloraConfig().quantization.blocksize


def test_eval_takes_the_training_configs_data_settings():
    data, training = QloraConfig().data, QloraConfig().training
    for name in ("format", "template", "overlong", "text_field", "messages_field"):
        assert EvalOptions.model_fields[name].default == getattr(data, name), name
        assert EvalOptions.model_fields[name].annotation == type(data).model_fields[name].annotation, name
    assert EvalOptions.model_fields["max_seq_length"].default == training.max_seq_length


def test_quantize_options_are_the_quantize_function_arguments():
    from qlorakit.model.quantize_checkpoint import quantize_checkpoint

    assert set(inspect.signature(quantize_checkpoint).parameters) == set(QuantizeOptions.model_fields)


def test_serve_allows_the_batch_the_server_holds():
    from qlorakit.infer.serve import MAX_ROWS

    bounds = {type(m).__name__: m for m in ServeOptions.model_fields["max_batch"].metadata}
    assert (bounds["Ge"].ge, bounds["Le"].le) == (1, MAX_ROWS)


def test_help_shows_every_default_and_what_each_switch_turns_off():
    for command, model in COMMANDS.items():
        actions = arguments(subparser(command))
        for name, field in model.model_fields.items():
            text = actions[name].help or ""
            if not field.is_required() and field.default is not None and not isinstance(field.default, bool):
                shown = repr(field.default) if isinstance(field.default, str) and not actions[name].choices \
                    else str(field.default)
                assert f"default: {shown})" in text, (command, name)
            if is_switch_off(field):
                assert text.endswith(f"(default: {field.description})"), (command, name)


def test_serve_prints_the_device_and_dtype_it_derives(monkeypatch, caplog):
    from qlorakit.infer import serve

    seen = []
    monkeypatch.setattr(serve, "serve_command", lambda opts: seen.append(opts) or 0)
    caplog.set_level(logging.INFO)
    assert cli.main(["serve", "--device", "cpu", "--port", "0", "--adapter", "a=x"]) == 0
    assert seen == [ServeOptions(device="cpu", port=0, adapter=["a=x"])]
    assert "device cpu, compute dtype float32 (derived from the device: bfloat16 on CUDA, float32 elsewhere)" \
        in caplog.text


def test_generate_prints_the_device_and_dtype_it_derives(monkeypatch, caplog, tmp_path):
    from qlorakit.errors import QlorakitError
    from qlorakit.model import build

    def stop(*args, **kwargs):
        raise QlorakitError("stopped before the tokenizer")

    monkeypatch.setattr(build, "resolve_model_dir", lambda name: tmp_path)
    monkeypatch.setattr(build, "load_tokenizer", stop)
    caplog.set_level(logging.INFO)
    assert cli.main(["generate", "--prompt", "hi", "--device", "cpu"]) == 2
    assert "qlorakit: device cpu, compute dtype float32 (derived from the device" in caplog.text
