"""Preference pairs (data/pairs.py, data/pair_examples.py): read and checked with one-line errors naming file,
record and field; tokenised, truncated and collated into exactly the batch TRL 1.15's DPOTrainer builds from the
same records (standard and conversational, with and without truncation); the report's counts; the split."""

from __future__ import annotations

import copy
import json
import tempfile

import numpy as np
import pytest
import torch
from datahelpers import make_chatml_tokenizer, make_plain_tokenizer, write_jsonl

from qlorakit.data.pairs import check_pairs, read_pairs, tokenize_pairs
from qlorakit.errors import DataFormatError

LONG = "The quick brown fox jumps over the lazy dog. " * 3


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


STANDARD = [
    {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Paris."},
    # the prompt's trailing space merges with the completion's first word: the split is where the tokens part
    {"prompt": "What is two plus two? ", "chosen": "Four.", "rejected": "The quick brown fox."},
    {"prompt": "Translate to French: good morning.", "chosen": " Bonjour.", "rejected": " Hello."},
    {"prompt": LONG + "What is the capital of France?", "chosen": " Paris.", "rejected": " The lazy dog."},
    {"prompt": "What is two plus two?", "chosen": " Eat well, sleep well, and exercise. Hello world, this is a tiny "
     "corpus.", "rejected": " No."},
    {"prompt": "Give three tips for staying healthy.", "chosen": " Eat well.", "rejected": " Sleep well."},
]
CONVERSATIONAL = [
    {"prompt": user("What is two plus two?"), "chosen": reply("Four."), "rejected": reply("Paris, the capital.")},
    {"prompt": [{"role": "system", "content": "Be brief."}, *user("Hi."), *reply("Hello."),
                *user("Capital of France?")],
     "chosen": reply("Paris."), "rejected": reply("The quick brown fox jumps over the lazy dog.")},
    {"prompt": user(LONG), "chosen": reply("Yes."), "rejected": reply("No.")},
    {"prompt": user("Hi."), "chosen": reply("Hello world."), "rejected": [*reply("Hello."), *reply("Goodbye.")]},
]


def with_eos(records: list[dict], eos: str) -> list[dict]:
    """The records plus one whose completions already end with the EOS text (none is appended to those)."""
    return [*records, {"prompt": "Hi.", "chosen": " Hello." + eos, "rejected": " Bye." + eos}]


def trl_batch(records: list[dict], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """The first batch TRL's DPOTrainer collates from `records`, in file order, all in one batch."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=256)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(records), max_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", bf16=False, max_length=max_length,
                     train_sampling_strategy="sequential")
    trainer = DPOTrainer(model=LlamaForCausalLM(cfg), args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, peft_config=peft.LoraConfig(r=2, target_modules=["q_proj"]))
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("fmt,tokenizer_kind,max_length,dropped,cut", [
    ("standard", "chatml", 1024, 0, 0),
    ("standard", "plain", 1024, 0, 0),  # BOS added by the tokenizer
    ("conversational", "chatml", 1024, 0, 0),
    # records 1 and 4 lose completion ends, 2 keeps one completion token, 3 and 5 fill max_length and are dropped
    ("standard", "plain", 13, 2, 3),
    ("conversational", "chatml", 36, 2, 2),
])
def test_collated_batch_equals_trl_dpo_trainers(fmt, tokenizer_kind, max_length, dropped, cut):
    make = {"chatml": make_chatml_tokenizer, "plain": make_plain_tokenizer}[tokenizer_kind]
    tokenizer = make()
    records = with_eos(STANDARD, tokenizer.eos_token) if fmt == "standard" else CONVERSATIONAL
    theirs = trl_batch(copy.deepcopy(records), make(), max_length)
    pairs, report = tokenize_pairs(records, tokenizer, max_length)
    ours = pairs.collate([[i] for i in range(len(pairs))], tokenizer.pad_token_id)
    assert (report.fmt, report.records, report.pairs, report.dropped) == (fmt, len(records), len(pairs), dropped)
    assert report.completions_cut == cut and report.prompts_cut == 0
    assert len(pairs) == len(records) - dropped
    assert set(ours) == {"input_ids", "attention_mask", "completion_mask"}
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype == torch.int64
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["input_ids"].shape[1] <= max_length
    # lengths (for the batch planner): the longer of each pair's two sequences
    rows = ours["attention_mask"].sum(dim=1).numpy()
    assert np.array_equal(pairs.lengths, np.maximum(rows[:len(pairs)], rows[len(pairs):]))


def test_standard_completions_end_with_eos_and_a_bos_tokenizer_starts_prompts_with_bos(plain_tokenizer):
    pairs, _ = tokenize_pairs(STANDARD[:1], plain_tokenizer, 64)
    prompt, chosen, rejected = pairs.get(0)
    assert prompt[0] == plain_tokenizer.bos_token_id and prompt[1:].tolist().count(plain_tokenizer.bos_token_id) == 0
    assert chosen[-1] == rejected[-1] == plain_tokenizer.eos_token_id
    assert plain_tokenizer.decode(chosen) == " Four.</s>"
    # a prompt ending in a space: " Four" is one token, so the completion starts with the prompt's space
    pairs, _ = tokenize_pairs(STANDARD[1:2], plain_tokenizer, 64)
    prompt, chosen, _ = pairs.get(0)
    assert plain_tokenizer.decode(prompt) == "<s>What is two plus two?"
    assert plain_tokenizer.decode(chosen) == " Four.</s>"


def test_max_prompt_length_keeps_the_prompts_end_and_its_bos(plain_tokenizer, chatml_tokenizer):
    record = {"prompt": LONG + "What is two plus two?", "chosen": " Four, the quick brown fox.", "rejected": " No."}
    for tokenizer in (plain_tokenizer, chatml_tokenizer):
        whole, _ = tokenize_pairs([record], tokenizer, 1024)
        prompt, chosen, rejected = whole.get(0)
        cut, report = tokenize_pairs([record], tokenizer, 16, max_prompt_length=10)
        p, c, r = cut.get(0)
        if tokenizer.bos_token_id is not None:
            assert p.tolist() == [tokenizer.bos_token_id] + prompt[-9:].tolist()
        else:
            assert p.tolist() == prompt[-10:].tolist()
        assert c.tolist() == chosen[:6].tolist() and r.tolist() == rejected.tolist()  # " No.</s>" fits in 6
        assert (report.prompts_cut, report.completions_cut, report.dropped) == (1, 1, 0)
        assert cut.lengths.tolist() == [16]


def test_a_pair_that_fits_keeps_its_long_prompt(plain_tokenizer):
    record = {"prompt": LONG, "chosen": " Yes.", "rejected": " No."}
    whole, _ = tokenize_pairs([record], plain_tokenizer, 1024)
    kept, report = tokenize_pairs([record], plain_tokenizer, int(whole.lengths[0]), max_prompt_length=4)
    assert np.array_equal(kept.get(0)[0], whole.get(0)[0]) and report.prompts_cut == 0


def test_report_counts_and_line(plain_tokenizer):
    records = [
        {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Paris."},  # fits 20
        {"prompt": "What is two plus two?", "chosen": LONG, "rejected": " No."},  # chosen cut
        {"prompt": LONG + "Why?", "chosen": " Yes.", "rejected": " No."},  # prompt cut, or dropped without a limit
        {"prompt": LONG, "chosen": LONG, "rejected": LONG},  # both
    ]
    _, report = tokenize_pairs(records, plain_tokenizer, 20, max_prompt_length=8, source="prefs.jsonl")
    assert (report.records, report.pairs, report.prompts_cut, report.completions_cut, report.dropped) == (4, 4, 2, 2, 0)
    assert report.line() == ("prefs.jsonl (standard pairs): 4 records -> 4 pairs, 2 prompts cut to their last 8 "
                             "tokens, 2 pairs with completions cut to fit max_length 20; longest pair "
                             f"{report.longest} tokens")
    assert report.longest > 60
    _, report = tokenize_pairs(records, plain_tokenizer, 20, source="prefs.jsonl")
    assert (report.pairs, report.prompts_cut, report.completions_cut, report.dropped) == (2, 0, 1, 2)
    assert "2 dropped (prompt fills max_length 20)" in report.line() and "\n" not in report.line()


def test_every_prompt_filling_max_length_is_one_line(plain_tokenizer):
    with pytest.raises(DataFormatError) as err:
        tokenize_pairs([{"prompt": LONG, "chosen": " a", "rejected": " b"}], plain_tokenizer, 8, source="p.jsonl")
    assert str(err.value).startswith("p.jsonl: no pair left: every prompt fills max_length 8 tokens (")
    assert "\n" not in str(err.value)


def test_limits_are_checked(plain_tokenizer):
    for max_length, max_prompt in ((1, None), (8, 8), (8, 0)):
        with pytest.raises(ValueError):
            tokenize_pairs(STANDARD, plain_tokenizer, max_length, max_prompt)


def test_split_is_deterministic_disjoint_and_complete(chatml_tokenizer):
    records = [{"prompt": f"What is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": " Paris."} for i in range(10)]
    pairs, _ = tokenize_pairs(records, chatml_tokenizer, 64)
    train, held = pairs.split(3, seed=7)
    again_train, again_held = pairs.split(3, seed=7)
    assert (len(train), len(held)) == (7, 3)
    assert np.array_equal(held.record_ids, again_held.record_ids)
    assert np.array_equal(train.record_ids, again_train.record_ids)
    assert sorted([*train.record_ids, *held.record_ids]) == list(range(10))
    assert list(held.record_ids) == sorted(held.record_ids)
    i = int(held.record_ids[0])
    assert all(np.array_equal(a, b) for a, b in zip(held.get(0), pairs.get(i)))
    assert any(not np.array_equal(pairs.split(3, seed=s)[1].record_ids, held.record_ids) for s in range(8, 12))
    assert len(pairs.split(0, seed=7)[1]) == 0
    with pytest.raises(ValueError, match="at least one pair stays for training"):
        pairs.split(10, seed=7)


def test_collate_refuses_packed_rows(chatml_tokenizer):
    pairs, _ = tokenize_pairs(STANDARD[:2], chatml_tokenizer, 64)
    with pytest.raises(ValueError, match="preference pairs are not packed"):
        pairs.collate([[0, 1]], chatml_tokenizer.pad_token_id)


GOOD = STANDARD[0]
GOOD_CHAT = CONVERSATIONAL[0]
BAD = [
    (GOOD, {"prompt": "Hi.", "chosen": " Hello."},
     "'rejected' is missing (a preference record needs prompt, chosen and rejected)"),
    (GOOD, {"prompt": "Hi.", "chosen": 7, "rejected": " No."},
     "'chosen' must be a string or a list of {role, content} messages, got int"),
    (GOOD, {"prompt": "Hi.", "chosen": reply("Hello."), "rejected": " No."},
     "'prompt' is a string but 'chosen' is a list of messages; a record is either standard (prompt, chosen and "
     "rejected all strings) or conversational (all lists of {role, content} messages)"),
    (GOOD, {"prompt": "Hi.", "chosen": " Hello.", "rejected": ""},
     "'rejected' is an empty string; prompt, chosen and rejected must hold text"),
    (GOOD_CHAT, {"prompt": [*user("Hi."), *reply("Hello.")], "chosen": reply("a"), "rejected": reply("b")},
     "'prompt' must end with a user message, which chosen and rejected answer; its last message has role "
     "'assistant'"),
    (GOOD_CHAT, {"prompt": user("Hi."), "chosen": user("a"), "rejected": reply("b")},
     "'chosen' message 0 has role 'user'; chosen and rejected hold the assistant's reply messages only"),
    (GOOD_CHAT, {"prompt": user("Hi."), "chosen": reply("a"), "rejected": [{"role": "assistant"}]},
     "'rejected' message 0 has no 'content'"),
    (GOOD_CHAT, {"prompt": [{"role": "tool", "content": "x"}, *user("Hi.")], "chosen": reply("a"),
                 "rejected": reply("b")},
     "'prompt' message 0 has role 'tool'; allowed roles: system, user, assistant"),
    (GOOD_CHAT, {"prompt": user("Hi."), "chosen": [{"role": "assistant", "content": 3}], "rejected": reply("b")},
     "'chosen' message 0 content must be a string, got int"),
    (GOOD_CHAT, {"prompt": [], "chosen": reply("a"), "rejected": reply("b")},
     "'prompt' is an empty list; it must hold {role, content} messages"),
    (GOOD_CHAT, {"prompt": user("Hi."), "chosen": reply("a"), "rejected": reply("  ")},
     "'rejected' is an empty reply; its messages' content must hold text"),
    (GOOD, GOOD_CHAT,
     "is conversational but record 0 is standard; a file holds one format (a record is either standard (prompt, "
     "chosen and rejected all strings) or conversational (all lists of {role, content} messages))"),
]


@pytest.mark.parametrize("good,bad,message", BAD)
def test_a_bad_record_is_one_line_naming_file_record_and_field(tmp_path, good, bad, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, good, bad, good])
    with pytest.raises(DataFormatError) as err:
        read_pairs(path)
    assert str(err.value) == f"{path}: record 2: {message}"


def test_csv_empty_cell_and_a_record_that_is_no_mapping(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected\nHi.,Hello.,Bye.\n"What?",,No.\n', encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        read_pairs(path)
    assert str(err.value) == (f"{path}: record 1: 'chosen' is an empty string; prompt, chosen and rejected must "
                              "hold text")
    with pytest.raises(DataFormatError) as err:
        check_pairs([GOOD, ["Hi.", "a", "b"]], "pairs.json")
    assert str(err.value) == ("pairs.json: record 1: must be a mapping with prompt, chosen and rejected, got "
                              "['Hi.', 'a', 'b']")


def test_json_and_parquet_read_both_formats(tmp_path):
    datasets = pytest.importorskip("datasets")
    chat = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(CONVERSATIONAL).to_parquet(str(chat))
    assert read_pairs(chat) == CONVERSATIONAL
    plain = tmp_path / "pairs.json"
    plain.write_text(json.dumps([{**r, "id": i} for i, r in enumerate(STANDARD)]), encoding="utf-8")
    assert read_pairs(plain) == STANDARD  # other fields are left out


def test_tokenizer_problems_are_one_line(plain_tokenizer):
    with pytest.raises(DataFormatError) as err:
        tokenize_pairs(CONVERSATIONAL, plain_tokenizer, 64, source="c.jsonl")
    assert str(err.value).startswith("c.jsonl: conversational pairs are rendered through the tokenizer's chat "
                                     "template, and this tokenizer has none")
    strict = make_chatml_tokenizer()
    strict.chat_template = ("{% if messages|length > 2 %}{{ raise_exception('Only one turn') }}{% endif %}"
                            + strict.chat_template)
    with pytest.raises(DataFormatError) as err:
        tokenize_pairs(CONVERSATIONAL[:2], strict, 64, source="c.jsonl")
    assert str(err.value) == "c.jsonl: record 1: is refused by the tokenizer's chat template: Only one turn"
