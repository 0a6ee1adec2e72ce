"""prepare_data end to end: eval split or eval file, the overlong policy and its counts, the report line."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from datahelpers import ALPACA, target_spans, write_jsonl

from qlorakit.data import prepare_data, split_eval

MANY = [{"instruction": f"What is {i} plus two?", "output": f"It is {i + 2}."} for i in range(40)]


def test_split_eval_holds_out_whole_records_deterministically():
    record_ids = np.repeat(np.arange(20), 3)  # e.g. texts split into three chunks each
    train, held = split_eval(record_ids, 0.1, seed=3)
    assert len(held) == 6 and len(set(record_ids[held])) == 2
    assert not set(record_ids[held]) & set(record_ids[train])
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(60))
    assert np.array_equal(split_eval(record_ids, 0.1, seed=3)[1], held)
    assert not np.array_equal(split_eval(record_ids, 0.1, seed=4)[1], held)


@pytest.mark.parametrize("n_records,fraction,cap,expected", [
    (100, 0.05, None, 5), (100, 0.05, 2, 2), (10, 0.01, None, 1), (2, 0.9, None, 1), (1, 0.5, None, 0),
    (100, 0.0, None, 0),
])
def test_split_eval_sizes(n_records, fraction, cap, expected):
    _, held = split_eval(np.arange(n_records), fraction, seed=0, max_eval_examples=cap)
    assert len(held) == expected


def test_eval_split_off_the_training_file(tmp_path, chatml_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", MANY)
    prepared = prepare_data(data, chatml_tokenizer, fmt="alpaca", max_seq_length=256, eval_fraction=0.1,
                            cache_dir=None)
    assert len(prepared.train) == 36 and len(prepared.eval) == 4
    assert not set(prepared.train.record_ids) & set(prepared.eval.record_ids)
    assert prepared.report.train_examples == 36 and prepared.report.eval_examples == 4


def test_no_eval_when_the_fraction_is_zero(tmp_path, chatml_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", MANY)
    prepared = prepare_data(data, chatml_tokenizer, fmt="alpaca", max_seq_length=256, eval_fraction=0.0,
                            cache_dir=None)
    assert prepared.eval is None and len(prepared.train) == 40


def test_an_eval_file_keeps_the_whole_training_file_for_training(tmp_path, chatml_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", MANY)
    held = write_jsonl(tmp_path / "eval.jsonl", ALPACA)
    prepared = prepare_data(data, chatml_tokenizer, fmt="alpaca", max_seq_length=256, eval_file=held,
                            max_eval_examples=3, cache_dir=tmp_path / "cache")
    assert len(prepared.train) == 40 and len(prepared.eval) == 3
    ids, labels = prepared.eval.get(0)
    assert target_spans(chatml_tokenizer, ids, labels) == [ALPACA[0]["output"] + "<|im_end|>"]
    assert prepared.report.eval_file.records == 4


def test_overlong_examples_are_dropped_and_counted_in_one_log_line(tmp_path, chatml_tokenizer, caplog):
    long_one = {"instruction": "Tell a story.", "output": "The quick brown fox jumps over the lazy dog. " * 8}
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA + [long_one])
    with caplog.at_level(logging.INFO, logger="qlorakit.data"):
        prepared = prepare_data(data, chatml_tokenizer, fmt="alpaca", max_seq_length=64, eval_fraction=0.0,
                                cache_dir=None)
    assert len(prepared.train) == 4
    assert prepared.report.train_file.dropped == 1 and prepared.report.train_file.truncated == 0
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert "1 longer than max_seq_length 64 dropped" in record.getMessage()


def test_truncation_keeps_the_prompt_and_cuts_the_response(tmp_path, chatml_tokenizer):
    long_one = {"instruction": "Tell a story.", "output": "The quick brown fox jumps over the lazy dog. " * 8}
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA + [long_one])
    prepared = prepare_data(data, chatml_tokenizer, fmt="alpaca", max_seq_length=64, eval_fraction=0.0,
                            overlong="truncate", cache_dir=None)
    assert len(prepared.train) == 5 and prepared.report.train_file.truncated == 1
    ids, labels = prepared.train.get(4)
    assert len(ids) == 64 and labels[-1] == ids[-1] != chatml_tokenizer.eos_token_id
    [story] = target_spans(chatml_tokenizer, ids, labels)
    assert long_one["output"].startswith(story)
    assert "1 truncated to max_seq_length 64" in prepared.report.summary()


def test_a_prompt_that_fills_max_seq_length_is_dropped_even_when_truncating(tmp_path, chatml_tokenizer):
    long_prompt = {"instruction": "The quick brown fox jumps over the lazy dog. " * 8, "output": "Yes."}
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA + [long_prompt])
    prepared = prepare_data(data, chatml_tokenizer, fmt="alpaca", max_seq_length=64, eval_fraction=0.0,
                            overlong="truncate", cache_dir=None)
    assert len(prepared.train) == 4 and prepared.report.train_file.dropped == 1


def test_long_texts_are_split_and_the_report_says_so(tmp_path, plain_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 6},
                                              {"text": "Hello world."}])
    prepared = prepare_data(data, plain_tokenizer, fmt="text", max_seq_length=32, eval_fraction=0.0,
                            cache_dir=None)
    stats = prepared.report.train_file
    assert stats.split_texts == 1 and stats.chunks == len(prepared.train) - 1 > 1
    assert all(n <= 32 for n in prepared.train.lengths)
    assert f"1 texts longer than max_seq_length split into {stats.chunks} chunks" in prepared.report.summary()


def test_report_counts_tokens_and_target_tokens(tmp_path, chatml_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    prepared = prepare_data(data, chatml_tokenizer, fmt="alpaca", max_seq_length=256, eval_fraction=0.0,
                            cache_dir=None)
    report = prepared.report
    assert report.train_tokens == int(prepared.train.lengths.sum())
    outputs = sum(len(chatml_tokenizer(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in ALPACA)
    assert report.train_target_tokens == outputs
