"""`qlorakit eval` end to end on a tiny Llama: three models in one call (the 16-bit base, its NF4 quantization while
loading, NF4 + an adapter recorded as trained on it), the response-token loss of an alpaca file and a local
multiple-choice task, one table, one JSON file. Each number is held equal to an independent computation: the loss to
transformers' own forward on the same tokens (the NF4 columns: on a transformers model holding the dequantized
weights, with PEFT applying the adapter), the task scores and every item's log-likelihoods to lm-evaluation-harness's
own HF backend loading the same weights itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_helpers import MC_ITEMS, MC_TASK, direct_loss, hf_model

from qlorakit import cli
from qlorakit.data import prepare_data
from qlorakit.model.build import load_tokenizer

# Both sides take fp32 logits of the same fp32 weights through the same modules and differ only in the order of
# fp32 sums (a batch of right-padded rows under a mask against one row alone; the head over target rows against
# every position): a few ulps (6e-8 relative each) of hidden states and of logits of magnitude ~10, so a token's
# loss moves by ~1e-6 at most, ~2e-7 of a mean loss of ~6. 1e-6 relative is that bound with room (measured: 5e-9),
# and 600 times below the NF4 error here (the NF4 loss differs from the 16-bit one by ~6e-4 relative).
LOSS_RTOL = 1e-6


@pytest.fixture(scope="module")
def run(tiny_base, nf4_adapter, alpaca_data, mc_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-run") / "eval.json"
    args = ["eval", "--model", f"base={tiny_base}", "--model", f"nf4={tiny_base}:nf4",
            "--model", f"tuned={tiny_base}+{nf4_adapter}", "--data", str(alpaca_data), "--tasks", MC_TASK,
            "--include-path", str(mc_task), "--device", "cpu", "--json-path", str(out), "--log-samples",
            "--no-progress"]
    return out, args


@pytest.fixture(scope="module")
def result(run):
    import contextlib
    import io

    out, args = run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(args) == 0
    return json.loads(out.read_text(encoding="utf-8")), printed.getvalue()


@pytest.fixture(scope="module")
def examples(tiny_base, alpaca_data):
    """The data file's examples as the data layer tokenizes and masks them for training."""
    return prepare_data(alpaca_data, load_tokenizer(tiny_base), fmt="alpaca", max_seq_length=2048,
                        eval_fraction=0.0, cache_dir=None).train


def test_the_16bit_loss_is_transformers_own_on_the_same_tokens(result, tiny_base, examples):
    saved = result[0]["models"]["base"]
    loss, tokens = direct_loss(hf_model(tiny_base), examples)
    assert saved["precision"] == "bfloat16"
    assert (saved["data"]["tokens"], saved["data"]["examples"]) == (tokens, len(examples)) and len(examples) == 12
    assert saved["data"]["loss"] == pytest.approx(loss, rel=LOSS_RTOL)


def test_the_nf4_loss_is_that_of_the_dequantized_model(result, tiny_base, examples):
    saved = result[0]["models"]["nf4"]
    loss, tokens = direct_loss(hf_model(tiny_base, nf4=True), examples)
    assert saved["precision"] == "nf4 b64 dq" and saved["data"]["tokens"] == tokens
    assert saved["data"]["loss"] == pytest.approx(loss, rel=LOSS_RTOL)
    assert abs(saved["data"]["loss"] - result[0]["models"]["base"]["data"]["loss"]) > 10 * LOSS_RTOL * loss


def test_the_adapter_loss_is_pefts_on_the_dequantized_base(result, tiny_base, nf4_adapter, examples):
    from peft import PeftModel

    saved = result[0]["models"]["tuned"]
    loss, _ = direct_loss(PeftModel.from_pretrained(hf_model(tiny_base, nf4=True), str(nf4_adapter)).eval(), examples)
    assert saved["precision"] == "nf4 b64 dq" and saved["adapter"] == str(nf4_adapter)
    assert saved["data"]["loss"] == pytest.approx(loss, rel=LOSS_RTOL)


def harness_reference(model, tokenizer, mc_task: Path) -> dict:
    """lm-evaluation-harness on its own: HFLM loading `model` (a folder path, or a model object with `tokenizer`),
    the same task, batch size and defaults."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if isinstance(model, Path):
        lm = HFLM(pretrained=str(model), device="cpu", dtype="float32", batch_size=8)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    manager = TaskManager(include_path=str(mc_task), include_defaults=False)
    return simple_evaluate(model=lm, tasks=[MC_TASK], task_manager=manager, log_samples=True)


def test_task_scores_and_loglikelihoods_are_the_harness_hf_backends(result, tiny_base, mc_task):
    saved = result[0]["models"]
    for column, reference in (("base", harness_reference(tiny_base, None, mc_task)),
                              ("nf4", harness_reference(hf_model(tiny_base, nf4=True), load_tokenizer(tiny_base),
                                                        mc_task))):
        mine = saved[column]["tasks"][MC_TASK]
        theirs = reference["results"][MC_TASK]
        assert mine["n"] == MC_ITEMS
        for metric in ("acc", "acc_norm"):
            assert mine[metric] == theirs[f"{metric},none"], (column, metric)
            assert mine[f"{metric}_stderr"] == pytest.approx(theirs[f"{metric}_stderr,none"])
        items = saved[column]["samples"][MC_TASK]
        expected = {s["doc_id"]: s for s in reference["samples"][MC_TASK]}
        assert sorted(i["doc_id"] for i in items) == list(range(MC_ITEMS))
        for item in items:
            ref = expected[item["doc_id"]]
            assert item["target"] == ref["target"] and (item["acc"], item["acc_norm"]) == (ref["acc"], ref["acc_norm"])
            # The same fp32 weights through the same modules and the harness's own batching: the same floats.
            mine_ll = [ll for ll, _ in item["responses"]]
            assert mine_ll == [float(ll) for ll, _ in ref["filtered_resps"]], (column, item["doc_id"])
    accs = {saved[c]["tasks"][MC_TASK]["acc"] for c in saved}
    assert all(0 < a < 1 for a in accs)  # the scores carry information, not a degenerate 0 or 1


def test_one_table_a_column_per_model_a_row_per_metric(result, tiny_base, nf4_adapter, alpaca_data):
    saved, printed = result
    lines = printed.splitlines()
    assert lines[0].split() == ["base", "nf4", "tuned"]
    assert lines[1].split() == ["bfloat16", "nf4", "b64", "dq", "nf4", "b64", "dq", "+", "adapter"]
    labels = [line.split()[0] for line in lines[3:]]
    assert labels[:5] == ["data:", "loss", "ppl", "tokens", "examples"]
    assert labels[5:8] == [MC_TASK, "acc", "acc_norm"]
    loss_row = lines[4].split()[1:]
    assert [float(v) for v in loss_row] == pytest.approx([saved["models"][c]["data"]["loss"] for c in
                                                          ("base", "nf4", "tuned")], abs=1e-4)
    acc_row = next(line for line in lines if line.split()[0] == "acc")
    assert acc_row.count("±") == 3
    assert f"tuned: {tiny_base}+{nf4_adapter}" in lines
    assert lines[-1].startswith("wrote ")


def test_the_json_holds_every_number_and_how_it_was_measured(result, alpaca_data, run):
    saved, _ = result
    out, _ = run
    assert list(saved["models"]) == ["base", "nf4", "tuned"]
    assert saved["data"] == str(alpaca_data) and saved["tasks"] == [MC_TASK]
    assert saved["settings"]["device"] == "cpu" and saved["settings"]["compute_dtype"] == "float32"
    assert saved["settings"]["lm_eval_version"] == "0.4.13"
    for column in saved["models"].values():
        assert column["data"]["ppl"] == pytest.approx(__import__("math").exp(column["data"]["loss"]))
        assert column["load_seconds"] > 0 and column["eval_seconds"] > 0
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # written whole: no temporary file left
