"""Chat records the template cannot render are one DataFormatError line naming the file and the record: a
conversation that opens with the assistant (it used to reach apply_chat_template with an empty prefix and end in
a traceback), and any conversation a template refuses with its own raise_exception."""

from __future__ import annotations

import pytest
from datahelpers import make_chatml_tokenizer, write_jsonl

from qlorakit.data import prepare_data
from qlorakit.errors import DataFormatError

GOOD = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}


def failure(path, tokenizer) -> str:
    with pytest.raises(DataFormatError) as err:
        prepare_data(path, tokenizer, fmt="chat", max_seq_length=256, cache_dir=None)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: record "), message
    return message


def test_conversation_opening_with_the_assistant_names_file_and_record(tmp_path, chatml_tokenizer):
    opening = {"messages": [{"role": "assistant", "content": "How can I help?"},
                            {"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4."}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, opening, GOOD])
    assert failure(path, chatml_tokenizer) == (
        f"{path}: record 1 starts with an assistant message; a conversation starts with a system or user message "
        "that the assistant answers")


def test_system_then_assistant_is_still_accepted(tmp_path, chatml_tokenizer):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi."}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [record, GOOD])
    prepared = prepare_data(path, chatml_tokenizer, fmt="chat", max_seq_length=256, cache_dir=None)
    assert prepared.report.train_file.examples == 2


def test_template_that_raises_is_one_line_with_its_reason(tmp_path):
    tokenizer = make_chatml_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' and loop.index0 >= 2 %}"
        "{{ raise_exception('Only two turns are supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    long = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, long])
    assert failure(path, tokenizer) == (f"{path}: record 1 is refused by the tokenizer's chat template: Only two "
                                        "turns are supported")
