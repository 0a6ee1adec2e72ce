"""Tokenised data is cached by everything it depends on, and a cache hit never calls the tokenizer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from datahelpers import ALPACA, make_chatml_tokenizer, write_jsonl

from qlorakit.data import prepare_data
from qlorakit.data.cache import tokenizer_fingerprint

OPTIONS = {"fmt": "alpaca", "max_seq_length": 256, "eval_fraction": 0.25}


def entries(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir())


def test_a_second_run_loads_from_the_cache_without_tokenising(tmp_path, chatml_tokenizer, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    first = prepare_data(data, chatml_tokenizer, cache_dir=tmp_path / "cache", **OPTIONS)
    assert not first.report.cache_hit

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was called on a cache hit")

    for name in ("__call__", "encode", "apply_chat_template"):
        monkeypatch.setattr(type(chatml_tokenizer), name, refuse)
    again = prepare_data(data, chatml_tokenizer, cache_dir=tmp_path / "cache", **OPTIONS)
    assert again.report == dataclasses.replace(first.report, cache_hit=True)
    for a, b in ((first.train, again.train), (first.eval, again.eval)):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.offsets, b.offsets)


def test_a_rebuilt_tokenizer_has_the_same_fingerprint_so_a_restart_hits_the_cache(chatml_tokenizer):
    assert tokenizer_fingerprint(make_chatml_tokenizer()) == tokenizer_fingerprint(chatml_tokenizer)


@pytest.mark.parametrize("change", ["max_seq_length", "template", "train_on_inputs", "file", "chat_template"])
def test_the_cache_key_changes_with_what_the_examples_depend_on(tmp_path, change):
    tokenizer = make_chatml_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    cache = tmp_path / "cache"
    prepare_data(data, tokenizer, cache_dir=cache, **OPTIONS)
    options = dict(OPTIONS)
    if change == "max_seq_length":
        options["max_seq_length"] = 128
    elif change == "template":
        options["template"] = "alpaca"
    elif change == "train_on_inputs":
        options["train_on_inputs"] = True
    elif change == "file":
        write_jsonl(data, ALPACA + [{"instruction": "One more.", "output": "Done."}])
    else:
        tokenizer.chat_template = tokenizer.chat_template.replace("helpful", "terse")
    assert not prepare_data(data, tokenizer, cache_dir=cache, **options).report.cache_hit
    assert len(entries(cache)) == 2


def test_eval_settings_reuse_the_cached_tokenisation(tmp_path, chatml_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    prepare_data(data, chatml_tokenizer, cache_dir=tmp_path / "cache", **OPTIONS)
    other = prepare_data(data, chatml_tokenizer, cache_dir=tmp_path / "cache", **{**OPTIONS, "eval_fraction": 0.5})
    assert other.report.cache_hit and other.report.eval_examples == 2


def test_entries_are_complete_folders_with_no_temporary_left_behind(tmp_path, chatml_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    prepare_data(data, chatml_tokenizer, cache_dir=tmp_path / "cache", **OPTIONS)
    [entry] = entries(tmp_path / "cache")
    assert len(entry) == 64 and not entry.startswith(".")
    assert sorted(p.name for p in (tmp_path / "cache" / entry).iterdir()) == [
        "ids.npy", "labels.npy", "manifest.json", "offsets.npy", "record_ids.npy"]


def test_a_damaged_entry_is_tokenised_again(tmp_path, chatml_tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    first = prepare_data(data, chatml_tokenizer, cache_dir=tmp_path / "cache", **OPTIONS)
    [entry] = entries(tmp_path / "cache")
    (tmp_path / "cache" / entry / "labels.npy").write_bytes(b"garbage")
    again = prepare_data(data, chatml_tokenizer, cache_dir=tmp_path / "cache", **OPTIONS)
    assert not again.report.cache_hit and np.array_equal(again.train.labels, first.train.labels)
    assert prepare_data(data, chatml_tokenizer, cache_dir=tmp_path / "cache", **OPTIONS).report.cache_hit
