"""Preference tuning through the whole pipeline on the tiny model (CPU): `training.objective: dpo` (and the
others) reads prompt/chosen/rejected records, trains, logs TRL's metric names, raises the held-out pairs'
rewards/accuracies, resumes exactly, and refuses a bad record in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pipeline_helpers import read_events, run_tree, train_losses

from qlorakit.adapters.peft_format import lora_state_dict
from qlorakit.config import config_from_dict
from qlorakit.train.run import run_training

SUBJECTS = ["two plus two", "the capital of France", "a tiny corpus", "the quick brown fox", "the lazy dog",
            "three tips", "staying healthy", "good morning", "the tests", "this world"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """One consistent preference: the chosen reply is always 'Four.', the rejected one always 'Paris.'."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"What is {s}? ({i})", "chosen": " Four.", "rejected": " Paris."}
            for i in range(4) for s in SUBJECTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(model_dir, data, out, objective="dpo", **training):
    return config_from_dict(run_tree(model_dir, data, out, training={
        "objective": objective, "max_steps": 12, "batch_size": 4, "learning_rate": 2e-2, "eval_every": 6,
        **training}, data={"eval_fraction": 0.2}))


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo"])
def test_an_objective_trains_and_raises_held_out_accuracy(tiny_model_dir, pairs_file, tmp_path, objective):
    out = run_training(_cfg(tiny_model_dir, pairs_file, tmp_path / objective, objective), progress=False)
    evals = read_events(tmp_path / objective, "eval")
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 12 and first["eval_pairs"] == 8
    assert last["eval_rewards/accuracies"] >= 0.8 and last["eval_rewards/margins"] > first["eval_rewards/margins"]
    trains = read_events(tmp_path / objective, "train")
    assert len(trains) == 12 and {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                  "logps/chosen", "logps/rejected"} <= set(trains[-1])
    if objective in ("dpo", "ipo"):  # the reference is the base: at step 0 policy and reference agree
        assert first["eval_rewards/margins"] == 0.0
    assert (tmp_path / objective / "adapter" / "adapter_model.safetensors").is_file() and out.result.steps == 12


def test_a_stopped_dpo_run_resumes_exactly(tiny_model_dir, pairs_file, tmp_path):
    whole = run_training(_cfg(tiny_model_dir, pairs_file, tmp_path / "whole", max_steps=6,
                              gradient_accumulation=2), progress=False)
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "cut", max_steps=6, gradient_accumulation=2)
    run_training(cfg, progress=False, stop_after_steps=3)
    resumed = run_training(cfg, progress=False)
    assert resumed.result.resumed_from == 3
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "whole")
    a, b = lora_state_dict(whole.model), lora_state_dict(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_record_is_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi", "chosen": " Four."}) + "\n", encoding="utf-8")
    from qlorakit.errors import QlorakitError

    with pytest.raises(QlorakitError) as err:
        run_training(_cfg(tiny_model_dir, bad, tmp_path / "bad"), progress=False)
    message = str(err.value)
    assert "\n" not in message and "bad.jsonl" in message and "rejected" in message


@pytest.mark.parametrize("tree,words", [
    ({"training": {"objective": "dpo"}, "data": {"format": "chat"}}, "drop data.format"),
    ({"training": {"objective": "orpo"}, "data": {"packing": True}}, "drop data.packing"),
    ({"training": {"objective": "dpo", "distributed": "fsdp"}}, "drop training.distributed"),
    ({"training": {"objective": "dpo", "label_smoothing": 0.1}}, "label_smoothing applies to objective simpo"),
    ({"training": {"objective": "kto"}}, "objective"),
    ({"training": {"objective": "orpo", "reference_adapter": "runs/sft/adapter"}},
     "reference_adapter applies to objectives dpo and ipo"),
    ({"training": {"objective": "simpo", "precompute_ref_logps": True}},
     "precompute_ref_logps applies to objectives dpo and ipo"),
])
def test_preference_settings_that_do_not_go_together_are_one_line(tree, words):
    from qlorakit.errors import QloraConfigError

    with pytest.raises(QloraConfigError) as err:
        config_from_dict({"model": {"name": "m"}, **tree})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_dpo_continues_from_an_sft_adapter_which_is_also_its_reference(tiny_model_dir, pattern_data, pairs_file,
                                                                        tmp_path):
    sft = run_training(config_from_dict(run_tree(tiny_model_dir, pattern_data, tmp_path / "sft",
                                                 training={"max_steps": 3})), progress=False)
    adapter = str(sft.adapter_dir)
    out = run_training(_cfg(tiny_model_dir, pairs_file, tmp_path / "dpo", max_steps=6, reference_adapter=adapter),
                       progress=False)
    first = read_events(tmp_path / "dpo", "eval")[0]
    # at step 0 the policy is the SFT adapter, and so is the reference: equal log-probs, loss log 2
    assert first["eval_rewards/margins"] == 0.0 and abs(first["eval_loss"] - 0.6931471805599453) < 1e-6
    last = read_events(tmp_path / "dpo", "eval")[-1]
    assert last["eval_rewards/margins"] > 0 and out.result.steps == 6
    # a reference adapter of another shape is refused in one line, before training
    from qlorakit.errors import QloraConfigError

    with pytest.raises(QloraConfigError) as err:
        run_training(config_from_dict(run_tree(tiny_model_dir, pairs_file, tmp_path / "bad", lora={"rank": 4},
                                               training={"objective": "dpo", "reference_adapter": adapter})),
                     progress=False)
    assert "training.reference_adapter" in str(err.value) and "\n" not in str(err.value)


def test_qlorakit_pairs_makes_dpo_data_from_sft_data(tiny_model_dir, pattern_data, tmp_path, capsys):
    """`qlorakit pairs`: the SFT answers chosen, the model's sampled replies rejected, in TRL's conversational
    format, readable by the preference data path and trainable with DPO; the same seed gives the same file."""
    from pipeline_helpers import PATTERN

    from qlorakit import cli
    from qlorakit.data.pairs import read_pairs

    args = ["pairs", "--model", str(tiny_model_dir), "--data", str(pattern_data), "--max-pairs", "12",
            "--max-new-tokens", "8", "--batch-size", "5", "--device", "cpu", "--seed", "3"]
    assert cli.main([*args, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "b.jsonl")]) == 0
    text = (tmp_path / "a.jsonl").read_text(encoding="utf-8")
    assert text == (tmp_path / "b.jsonl").read_text(encoding="utf-8")
    pairs = read_pairs(tmp_path / "a.jsonl")
    assert 0 < len(pairs) <= 12 and "written to" in capsys.readouterr().err
    assert all(p["prompt"][0]["role"] == "user" and p["prompt"][0]["content"].startswith("Say it ")
               and p["chosen"] == [{"role": "assistant", "content": PATTERN}]
               and p["rejected"][0]["content"].strip() != PATTERN.strip() for p in pairs)
    out = run_training(_cfg(tiny_model_dir, tmp_path / "a.jsonl", tmp_path / "dpo", max_steps=2), progress=False)
    assert out.result.steps == 2 and all(math.isfinite(x) for x in out.result.losses)


def test_qlorakit_pairs_refuses_a_bad_sft_record_in_one_line(tiny_model_dir, tmp_path, capsys):
    from qlorakit import cli

    bad = tmp_path / "sft.jsonl"
    bad.write_text(json.dumps({"instruction": "Hi"}) + "\n", encoding="utf-8")
    assert cli.main(["pairs", "--model", str(tiny_model_dir), "--data", str(bad), "--out",
                     str(tmp_path / "p.jsonl"), "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sft.jsonl: record 0" in err[0] and "'output'" in err[0]
    assert not (tmp_path / "p.jsonl").exists()


def test_qlorakit_train_says_the_held_out_accuracy_and_margin(tiny_model_dir, pairs_file, tmp_path, capsys):
    from pipeline_helpers import write_yaml

    from qlorakit import cli

    tree = run_tree(tiny_model_dir, pairs_file, tmp_path / "run", training={
        "objective": "dpo", "max_steps": 4, "batch_size": 4, "learning_rate": 2e-2}, data={"eval_fraction": 0.2})
    assert cli.main(["train", str(write_yaml(tmp_path / "dpo.yaml", tree)), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "rewards/accuracies 0.000 -> " in out and "(held-out pairs)" in out and "perplexity" not in out


def test_precomputed_reference_log_probs_train_as_the_step_reference_does_and_resume_exactly(
        tiny_model_dir, pairs_file, tmp_path, caplog):
    """training.precompute_ref_logps: one pass before training (eval mode; LoRA dropout is 0 here, so eval and
    train mode compute the same), kept in the output folder and read back on resume. The step's loss then equals
    the run that runs the reference forward in every step, up to fp32 rounding: the pass groups the pairs by
    length, so its matmuls see other paddings and may sum in another order (relative 2^-24 per operation on
    log-probs of about 30 nats over a few dozen tokens: well under 1e-4 nats; the DPO loss moves by beta times
    that)."""
    import logging

    from qlorakit.train.reference_cache import FILE

    every_step = run_training(_cfg(tiny_model_dir, pairs_file, tmp_path / "step", max_steps=6), progress=False)
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "pre", max_steps=6, precompute_ref_logps=True)
    with caplog.at_level(logging.INFO, logger="qlorakit.train"):
        run_training(cfg, progress=False, stop_after_steps=3)
    assert "reference log-probs of 40 pairs computed" in caplog.text and (tmp_path / "pre" / FILE).is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlorakit.train"):
        resumed = run_training(cfg, progress=False)
    assert resumed.result.resumed_from == 3 and "reference log-probs of 40 pairs read from" in caplog.text
    assert train_losses(tmp_path / "pre") == pytest.approx(train_losses(tmp_path / "step"), abs=1e-5)
    evals = read_events(tmp_path / "pre", "eval")
    assert evals[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5) and evals[-1]["eval_rewards/margins"] > 0
    whole = run_training(_cfg(tiny_model_dir, pairs_file, tmp_path / "whole", max_steps=6, precompute_ref_logps=True),
                         progress=False)
    # a damaged file (here: a valid header whose tensor data is cut short) is computed again, not a crash
    kept = (tmp_path / "whole" / FILE).read_bytes()
    (tmp_path / "whole" / FILE).write_bytes(kept[:-16])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlorakit.train"):
        again = run_training(_cfg(tiny_model_dir, pairs_file, tmp_path / "whole", max_steps=6, resume=False,
                                  precompute_ref_logps=True), progress=False)
    assert "could not be read" in caplog.text and "reference log-probs of 40 pairs computed" in caplog.text
    assert (tmp_path / "whole" / FILE).read_bytes() == kept and again.result.steps == 6
    assert train_losses(tmp_path / "pre") == train_losses(tmp_path / "whole")
    a, b = lora_state_dict(whole.model), lora_state_dict(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert every_step.result.steps == 6


def test_precomputed_reference_log_probs_are_the_reference_forward_s(tiny_model_dir, pairs_file):
    """The cached values equal reference_logps on the batches a step would build (the base, adapters off)."""
    from pathlib import Path

    import numpy as np

    from qlorakit.data.pairs import read_pairs, tokenize_pairs
    from qlorakit.model.build import load_tokenizer
    from qlorakit.model.loader import load_model
    from qlorakit.model.lora_inject import inject_lora
    from qlorakit.train.preference import reference_logps
    from qlorakit.train.reference_cache import compute_reference
    from qlorakit.train.runtime import Runtime

    tokenizer = load_tokenizer(Path(tiny_model_dir))
    pairs, _ = tokenize_pairs(read_pairs(pairs_file), tokenizer, 64, None, source=str(pairs_file))
    model, _ = load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu", progress=False)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    for name, p in model.named_parameters():  # a non-zero adapter, which the reference must not see
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    runtime = Runtime(torch.device("cpu"), torch.float32, torch.float32)
    cached = compute_reference(model, pairs, 3, runtime, tokenizer.pad_token_id, None)
    for start in range(0, len(pairs), 4):
        rows = [[i] for i in range(start, min(start + 4, len(pairs)))]
        ref = reference_logps(model, pairs.collate(rows, tokenizer.pad_token_id), None)
        got = cached[[r[0] for r in rows]]
        np.testing.assert_allclose(got[:, 0], ref.chosen.numpy(), rtol=1e-5)
        np.testing.assert_allclose(got[:, 1], ref.rejected.numpy(), rtol=1e-5)


def test_tokenized_pairs_are_cached_and_a_changed_file_is_tokenized_again(tiny_model_dir, pairs_file, tmp_path,
                                                                           caplog):
    """The second run reads the pairs from the token cache (data/pair_cache.py) and trains the same; a file with
    other bytes gets its own entry; a damaged entry is tokenized again."""
    import logging
    import shutil

    with caplog.at_level(logging.INFO, logger="qlorakit"):
        run_training(_cfg(tiny_model_dir, pairs_file, tmp_path / "a", max_steps=2), progress=False)
    assert "from the cache" not in caplog.text
    entries = sorted((tmp_path / "token-cache").glob("pairs-*"))
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        run_training(_cfg(tiny_model_dir, pairs_file, tmp_path / "b", max_steps=2), progress=False)
    assert "(tokenized earlier: from the cache)" in caplog.text and str(pairs_file) in caplog.text
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    changed = tmp_path / "changed.jsonl"
    changed.write_text(pairs_file.read_text(encoding="utf-8").replace("Four.", "Five."), encoding="utf-8")
    run_training(_cfg(tiny_model_dir, changed, tmp_path / "c", max_steps=2), progress=False)
    assert len(list((tmp_path / "token-cache").glob("pairs-*"))) == 2
    (entries[0] / "chosen_ids.npy").write_bytes(b"not numpy")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        run_training(_cfg(tiny_model_dir, pairs_file, tmp_path / "d", max_steps=2), progress=False)
    assert "is damaged" in caplog.text and train_losses(tmp_path / "d") == train_losses(tmp_path / "a")
    shutil.rmtree(tmp_path / "token-cache")


@pytest.mark.parametrize("objective,disable,expected", [
    ("sft", None, 0.05), ("dpo", None, 0.0), ("orpo", None, 0.0), ("dpo", False, 0.05), ("sft", True, 0.0)])
def test_lora_dropout_is_off_for_preference_objectives_unless_kept(objective, disable, expected):
    training = {"objective": objective} if disable is None else {"objective": objective, "disable_dropout": disable}
    cfg = config_from_dict({"model": {"name": "m"}, "lora": {"dropout": 0.05}, "training": training})
    from qlorakit.train.preference_setup import dropout_in_effect

    assert dropout_in_effect(cfg) == expected and cfg.lora.dropout == 0.05


def test_a_dpo_run_trains_without_the_configured_dropout_and_says_so(tiny_model_dir, pairs_file, tmp_path, caplog):
    import logging

    tree = run_tree(tiny_model_dir, pairs_file, tmp_path / "run", lora={"dropout": 0.1},
                    training={"objective": "dpo", "max_steps": 1})
    with caplog.at_level(logging.INFO, logger="qlorakit"):
        out = run_training(config_from_dict(tree), progress=False)
    assert "dropout 0 (lora.dropout 0.1 off: training.disable_dropout)" in caplog.text
    saved = json.loads((out.adapter_dir / "adapter_config.json").read_text())
    assert saved["lora_dropout"] == 0.0
