"""`qlorakit eval`'s refusals: each one line naming what was wrong and what to do, and each before any model loads
(EvalModel.load fails the test if it is reached). Also the `--model` syntax and how a spec decides the precision."""

from __future__ import annotations

import json
import sys

import pytest
from cli_helpers import one_error_line
from eval_helpers import MC_TASK

from qlorakit import cli
from qlorakit.errors import OptionValueError
from qlorakit.infer.eval_models import EvalModel, resolve_model
from qlorakit.options import EvalOptions
from qlorakit.options.model_spec import ModelSpec, parse_model_spec


@pytest.fixture
def no_model_loads(monkeypatch):
    monkeypatch.setattr(EvalModel, "load", lambda *a, **k: pytest.fail("a model was loaded before the refusal"))


def refused(capsys, *args: str) -> str:
    assert cli.main(["eval", "--no-progress", "--device", "cpu", *args]) == 2
    return one_error_line(capsys)


def test_an_unknown_task_is_named_with_a_close_match_and_how_to_list_tasks(tiny_base, mc_task, no_model_loads,
                                                                           capsys):
    line = refused(capsys, "--model", str(tiny_base), "--tasks", "tiny_mcc", "--include-path", str(mc_task))
    assert "no lm-evaluation-harness task, group or tag is named 'tiny_mcc'" in line
    assert f"did you mean {MC_TASK}" in line and f"`lm-eval ls tasks --include_path {mc_task}` lists them" in line


def test_a_task_whose_data_cannot_be_read_is_one_line_naming_it(tiny_base, mc_task, tmp_path, no_model_loads,
                                                                capsys):
    broken = tmp_path / "tasks"
    broken.mkdir()
    yaml = (mc_task / "tiny_mc.yaml").read_text().replace(str(mc_task / "tiny_mc.json"), str(tmp_path / "gone.json"))
    (broken / "tiny_mc.yaml").write_text(yaml)
    line = refused(capsys, "--model", str(tiny_base), "--tasks", MC_TASK, "--include-path", str(broken))
    assert line.startswith(f"qlorakit: error: --tasks {MC_TASK}: cannot build the task (")
    assert "a local task a readable data file" in line


def test_an_adapter_of_another_base_is_refused_unless_forced(other_base, nf4_adapter, alpaca_data, no_model_loads,
                                                             capsys, monkeypatch):
    spec = f"{other_base}+{nf4_adapter}"
    line = refused(capsys, "--model", spec, "--data", str(alpaca_data))
    assert f"--model {spec!r}: adapter {nf4_adapter} was trained on another base model" in line
    assert "use --force" in line
    monkeypatch.undo()  # --force: it loads and evaluates
    assert cli.main(["eval", "--no-progress", "--device", "cpu", "--force", "--model", spec, "--data",
                     str(alpaca_data)]) == 0


@pytest.mark.parametrize(("content", "words"), [("", "the file is empty"), ("[]", "the file holds no records")])
def test_an_empty_data_file_is_one_line_naming_it(tiny_base, tmp_path, content, words, no_model_loads, capsys):
    data = tmp_path / "empty.json"
    data.write_text(content)
    assert refused(capsys, "--model", str(tiny_base), "--data", str(data)) == f"qlorakit: error: {data}: {words}"


def test_a_missing_folder_or_adapter_is_one_line(tiny_base, tmp_path, alpaca_data, no_model_loads, capsys):
    missing = tmp_path / "nope"
    line = refused(capsys, "--model", f"base={missing}", "--data", str(alpaca_data))
    assert line == f"qlorakit: error: --model 'base={missing}': folder {missing} not found"
    line = refused(capsys, "--model", f"{tiny_base}+{missing}", "--data", str(alpaca_data))
    assert line == f"qlorakit: error: {missing}: adapter folder not found"


def test_a_4bit_folder_runs_as_stored_and_cannot_be_asked_for_16bit(tiny_base, alpaca_data, tmp_path, capsys):
    quantized = tmp_path / "nf4"
    assert cli.main(["quantize", str(tiny_base), str(quantized)]) == 0
    line = refused(capsys, "--model", f"{quantized}:16bit", "--data", str(alpaca_data))
    assert "stores 4-bit weights, which load only in 4 bits; ':16bit' needs a 16-bit folder" in line
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--no-progress", "--device", "cpu", "--model", f"stored={quantized}", "--model",
                     f"on-load={tiny_base}:nf4", "--data", str(alpaca_data), "--json-path", str(out)]) == 0
    saved = json.loads(out.read_text())["models"]
    assert (saved["stored"]["precision"], saved["on-load"]["precision"]) == ("nf4 b64 dq stored", "nf4 b64 dq")
    assert saved["stored"]["data"] == saved["on-load"]["data"]  # the same NF4 bytes, so the same numbers


BAD_OPTIONS = [
    (["--model", "m"], "nothing to evaluate: give --data FILE, --config YAML"),
    (["--model", "m", "--data", "a.jsonl", "--config", "c.yaml"], "--data and --config both name the data"),
    (["--model", "m", "--config", "c.yaml", "--format", "chat"], "--format: --config renders its data as its data "
                                                                "section says"),
    (["--model", "m", "--data", "a.jsonl", "--limit", "5"], "--limit applies to --tasks, which is not given"),
    (["--model", "m", "--tasks", "t", "--log-samples"], "--log-samples writes the items into --json-path"),
    (["--model", "m", "--tasks", "t", "--limit", "0"], "--limit 0: allowed an integer >= 1"),
    (["--model", "a=x:int8", "--tasks", "t"], "--model 'a=x:int8': unknown precision 'int8' (allowed: 16bit, nf4, "
                                              "fp4)"),
    (["--model", "x+a+b", "--tasks", "t"], "one adapter per model"),
    (["--model", "a=x", "--model", "a=y", "--tasks", "t"], "the name 'a' is taken by --model 'a=x'"),
]


@pytest.mark.parametrize(("args", "words"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_before_anything_runs(args, words, no_model_loads, capsys):
    assert words in refused(capsys, *args)


def test_without_the_harness_tasks_say_how_to_install_it(tiny_base, monkeypatch, no_model_loads, capsys):
    import qlorakit.infer

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.delitem(sys.modules, "qlorakit.infer.eval_harness", raising=False)
    monkeypatch.delattr(qlorakit.infer, "eval_harness", raising=False)
    line = refused(capsys, "--model", str(tiny_base), "--tasks", MC_TASK)
    assert "--tasks needs lm-evaluation-harness" in line and "pip install 'qlorakit[eval]'" in line


@pytest.mark.parametrize(("text", "spec"), [
    ("default", ModelSpec("default", "default", None, None, "default")),
    ("base=default", ModelSpec("base", "default", None, None, "base=default")),
    ("q=models/x:nf4", ModelSpec("q", "models/x", "nf4", None, "q=models/x:nf4")),
    ("t=default:fp4+runs/a", ModelSpec("t", "default", "fp4", "runs/a", "t=default:fp4+runs/a")),
    ("runs/k=v/merged", ModelSpec("runs/k=v/merged", "runs/k=v/merged", None, None, "runs/k=v/merged")),
    ("/m:16bit+ad", ModelSpec("/m:16bit+ad", "/m", "16bit", "ad", "/m:16bit+ad")),
])
def test_model_specs_parse(text, spec):
    assert parse_model_spec(text) == spec
    assert spec.model == (text.partition("=")[2] if spec.name != text else text)


@pytest.mark.parametrize("text", ["=x", "x+", "x:", "a=:nf4"])
def test_malformed_model_specs_are_refused(text):
    with pytest.raises(ValueError, match="expected \\[NAME=\\]FOLDER"):
        parse_model_spec(text)


def test_the_precision_follows_the_spec_then_the_adapters_record(tiny_base, nf4_adapter):
    def how(text: str) -> tuple[bool, str]:
        m = resolve_model(parse_model_spec(text))
        return m.quantize, m.quant_type

    assert how(str(tiny_base)) == (False, "nf4")  # as stored: 16 bits
    assert how(f"{tiny_base}:fp4") == (True, "fp4")
    assert how(f"{tiny_base}+{nf4_adapter}") == (True, "nf4")  # as the adapter was trained
    assert how(f"{tiny_base}:16bit+{nf4_adapter}") == (False, "nf4")
    with pytest.raises(OptionValueError, match="was trained on a nf4 base, the spec asks for fp4"):
        how(f"{tiny_base}:fp4+{nf4_adapter}")


def test_python_callers_get_the_same_checks():
    with pytest.raises(OptionValueError, match="--data and --config both name the data"):
        EvalOptions(model=["m"], data="a", config="b")
    assert EvalOptions(model=["m"], tasks="t").specs() == [ModelSpec("m", "m", None, None, "m")]
