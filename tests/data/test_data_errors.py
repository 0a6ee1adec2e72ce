"""Every data problem a user can hit is one DataFormatError line naming the file and the record or field."""

from __future__ import annotations

import pytest
from datahelpers import ALPACA, make_chatml_tokenizer, write_jsonl

from qlorakit.data import prepare_data
from qlorakit.errors import DataFormatError


def failure(path, tokenizer, **options) -> str:
    options = {"fmt": "alpaca", "max_seq_length": 256, "cache_dir": None, **options}
    with pytest.raises(DataFormatError) as err:
        prepare_data(path, tokenizer, **options)
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    return message


def test_missing_data_file(tmp_path, chatml_tokenizer):
    assert "data file not found" in failure(tmp_path / "nope.jsonl", chatml_tokenizer)


def test_missing_eval_file_names_the_eval_file(tmp_path, chatml_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    with pytest.raises(DataFormatError, match=f"^{tmp_path / 'eval.jsonl'}: data file not found$"):
        prepare_data(train, chatml_tokenizer, fmt="alpaca", max_seq_length=256, cache_dir=None,
                     eval_file=tmp_path / "eval.jsonl")


def test_unsupported_extension(tmp_path, chatml_tokenizer):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"x")
    assert "unsupported data file extension '.xlsx'" in failure(path, chatml_tokenizer)


def test_alpaca_record_without_output_names_index_field_and_the_fields_it_has(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA[:2] + [{"instruction": "Hi", "response": "Hello"}])
    message = failure(path, chatml_tokenizer)
    assert message == (f"{path}: record 2 has no 'output' field; the alpaca format needs 'instruction' and "
                       "'output' (and optionally 'input'); this record has 'instruction', 'response'")


def test_text_record_without_the_text_field(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "Hello world."}])
    message = failure(path, chatml_tokenizer, fmt="text", text_field="body")
    assert "record 0 has no 'body' field" in message and "this record has 'content'" in message


def test_field_of_the_wrong_type(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add.", "output": 42}])
    assert "record 0 field 'output' must be a string, got 42" in failure(path, chatml_tokenizer)


def test_chat_record_without_messages(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversation": []}])
    assert "record 0 has no 'messages' field" in failure(path, chatml_tokenizer, fmt="chat")


def test_unknown_role(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "Hello"}]}])
    assert failure(path, chatml_tokenizer, fmt="chat") == \
        f"{path}: record 0 message 1 has role 'tool'; allowed roles: system, user, assistant"


def test_chat_record_without_an_assistant_reply(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    assert "record 0 has no assistant message" in failure(path, chatml_tokenizer, fmt="chat")


def test_chat_format_needs_a_chat_template(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    assert "this tokenizer has none" in failure(path, plain_tokenizer, fmt="chat")


def test_chat_template_for_alpaca_needs_a_chat_template(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    assert "template 'chat_template' needs a tokenizer with a chat template" in \
        failure(path, plain_tokenizer, template="chat_template")


def test_empty_dataset_after_filtering(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": ""}, {"instruction": "b", "output": " "}])
    assert "no examples left after filtering (2 records -> 0 examples, 2 with nothing to learn skipped)" in \
        failure(path, chatml_tokenizer)


def test_a_file_with_no_records(tmp_path, chatml_tokenizer):
    path = tmp_path / "d.json"
    path.write_text("[]", encoding="utf-8")
    assert failure(path, chatml_tokenizer) == f"{path}: the file holds no records"


def test_every_example_longer_than_max_seq_length(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    message = failure(path, chatml_tokenizer, max_seq_length=16)
    assert "every example is longer than max_seq_length 16 tokens (4 records -> 0 examples, 4 longer than" in message
    assert "raise max_seq_length or use overlong='truncate'" in message


def test_a_chat_template_that_rewrites_earlier_turns_cannot_be_masked(tmp_path):
    tokenizer = make_chatml_tokenizer()
    # numbering turns from the end changes every earlier turn when one is added
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + "
                               "(loop.length - loop.index) | string + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant 0\\n' }}{% endif %}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    assert "record 0 cannot be masked: the chat template does not render message 1 as a token continuation" in \
        failure(path, tokenizer, fmt="chat")
