"""Each format renders as its template says, and the loss covers exactly the response tokens plus EOS."""

from __future__ import annotations

import pytest
from datahelpers import ALPACA, target_spans

from qlorakit.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, record_pieces, resolve_template
from qlorakit.data.pieces import IGNORE_INDEX

MULTI_TURN = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]}


def render(tokenizer, record, fmt, template="chat_template", train_on_inputs=False, max_seq_length=512):
    return record_pieces(tokenizer, record, fmt=fmt, template=template, train_on_inputs=train_on_inputs,
                         max_seq_length=max_seq_length, text_field="text", messages_field="messages")


def decode(tokenizer, ids):
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def test_alpaca_through_chat_template_puts_input_after_a_blank_line(chatml_tokenizer):
    [(ids, labels)] = render(chatml_tokenizer, ALPACA[1], "alpaca", "chat_template")
    assert decode(chatml_tokenizer, ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nTranslate to French.\n\ngood morning<|im_end|>\n"
        "<|im_start|>assistant\nBonjour.<|im_end|>")
    assert target_spans(chatml_tokenizer, ids, labels) == ["Bonjour.<|im_end|>"]


def test_alpaca_through_chat_template_without_input_is_the_instruction_alone(chatml_tokenizer):
    [(ids, labels)] = render(chatml_tokenizer, ALPACA[2], "alpaca", "chat_template")
    assert "<|im_start|>user\nWhat is two plus two?<|im_end|>" in decode(chatml_tokenizer, ids)
    assert target_spans(chatml_tokenizer, ids, labels) == ["Four.<|im_end|>"]


@pytest.mark.parametrize("record", [ALPACA[1], ALPACA[2]], ids=["with-input", "without-input"])
def test_alpaca_prompt_is_the_classic_one_with_the_input_section_only_when_given(plain_tokenizer, record):
    [(ids, labels)] = render(plain_tokenizer, record, "alpaca", "alpaca")
    prompt = (ALPACA_PROMPT if record["input"] else ALPACA_PROMPT_NO_INPUT).format(**record)
    assert decode(plain_tokenizer, ids) == "<s>" + prompt + record["output"] + "</s>"
    assert target_spans(plain_tokenizer, ids, labels) == [record["output"] + "</s>"]


def test_auto_template_is_the_chat_template_when_there_is_one_else_alpaca(chatml_tokenizer, plain_tokenizer):
    assert resolve_template("alpaca", "auto", chatml_tokenizer, "f") == "chat_template"
    assert resolve_template("alpaca", "auto", plain_tokenizer, "f") == "alpaca"
    assert resolve_template("alpaca", "alpaca", chatml_tokenizer, "f") == "alpaca"
    assert resolve_template("chat", "auto", chatml_tokenizer, "f") == "chat_template"
    assert resolve_template("text", "auto", plain_tokenizer, "f") == "none"


def test_chat_masks_cover_exactly_each_assistant_reply_and_its_end_of_turn(chatml_tokenizer):
    [(ids, labels)] = render(chatml_tokenizer, MULTI_TURN, "chat")
    assert decode(chatml_tokenizer, ids) == chatml_tokenizer.apply_chat_template(
        MULTI_TURN["messages"], tokenize=False).removesuffix("\n")
    assert target_spans(chatml_tokenizer, ids, labels) == ["Four.<|im_end|>", "Paris.<|im_end|>"]
    # the newline after the first <|im_end|> belongs to the next prompt, not to the reply
    first_end = [i for i, t in enumerate(ids) if t == chatml_tokenizer.eos_token_id][2]
    assert labels[first_end] == chatml_tokenizer.eos_token_id and labels[first_end + 1] == IGNORE_INDEX


def test_chat_turns_after_the_last_reply_are_left_out(chatml_tokenizer):
    record = {"messages": MULTI_TURN["messages"] + [{"role": "user", "content": "Thanks!"}]}
    assert render(chatml_tokenizer, record, "chat") == render(chatml_tokenizer, MULTI_TURN, "chat")


def test_text_is_all_target_with_the_tokenizers_bos_and_one_eos(plain_tokenizer):
    [(ids, labels)] = render(plain_tokenizer, {"text": "Hello world."}, "text")
    assert decode(plain_tokenizer, ids) == "<s>Hello world.</s>"
    assert labels[0] == IGNORE_INDEX and list(labels[1:]) == list(ids[1:])


def test_text_longer_than_max_seq_length_is_split_so_every_token_is_predicted_once(chatml_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    [(whole, _)] = render(chatml_tokenizer, {"text": text}, "text")
    pieces = render(chatml_tokenizer, {"text": text}, "text", max_seq_length=8)
    assert len(pieces) > 2 and all(len(ids) <= 8 for ids, _ in pieces)
    predicted = [t for _, labels in pieces for t in labels if t != IGNORE_INDEX]
    assert predicted == list(whole[1:])
    for (prev, _), (ids, _) in zip(pieces, pieces[1:]):
        assert ids[0] == prev[-1]


def test_train_on_inputs_learns_the_prompt_too(chatml_tokenizer):
    [(ids, labels)] = render(chatml_tokenizer, MULTI_TURN, "chat", train_on_inputs=True)
    assert labels[0] == IGNORE_INDEX and list(labels[1:]) == list(ids[1:])
    [(ids, labels)] = render(chatml_tokenizer, ALPACA[1], "alpaca", "alpaca", train_on_inputs=True)
    assert labels[0] == IGNORE_INDEX and list(labels[1:]) == list(ids[1:])


@pytest.mark.parametrize("fmt,record,template", [
    ("alpaca", ALPACA[0], "chat_template"),
    ("alpaca", ALPACA[0], "alpaca"),
    ("chat", MULTI_TURN, "chat_template"),
    ("text", {"text": "Hello world."}, "none"),
])
def test_eos_is_learned_once_even_when_it_is_also_the_pad_token(chatml_tokenizer, fmt, record, template):
    eos = chatml_tokenizer.eos_token_id
    assert chatml_tokenizer.pad_token_id == eos
    [(ids, labels)] = render(chatml_tokenizer, record, fmt, template)
    assert ids[-1] == eos and labels[-1] == eos
    assert ids[-2] != eos


def test_an_output_that_already_ends_with_eos_gets_no_second_one(plain_tokenizer):
    record = {"instruction": "Say hi.", "output": "Hello world.</s>"}
    [(ids, _)] = render(plain_tokenizer, record, "alpaca", "alpaca")
    assert decode(plain_tokenizer, ids).endswith("Hello world.</s>") and ids[-2] != plain_tokenizer.eos_token_id


def test_bos_follows_the_tokenizer_and_is_never_doubled(chatml_tokenizer, plain_tokenizer):
    [(ids, _)] = render(plain_tokenizer, ALPACA[0], "alpaca", "alpaca")
    assert ids.count(plain_tokenizer.bos_token_id) == 1 and ids[0] == plain_tokenizer.bos_token_id
    [(ids, _)] = render(chatml_tokenizer, ALPACA[0], "alpaca", "alpaca")
    assert ids[0] != chatml_tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS in this tokenizer


@pytest.mark.parametrize("fmt,record", [
    ("alpaca", {"instruction": "Say hi.", "output": "  "}),
    ("chat", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}),
    ("text", {"text": "\n"}),
])
def test_a_record_with_nothing_to_learn_renders_to_nothing(chatml_tokenizer, fmt, record):
    assert render(chatml_tokenizer, record, fmt) == []
