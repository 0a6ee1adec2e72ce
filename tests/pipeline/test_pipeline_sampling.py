"""The repetition penalty of the decoders (infer/decode.py penalize_repeats, in decode_tokens under generate and
decode_rows) against transformers: its RepetitionPenaltyLogitsProcessor on random logits, and its `generate` with
that processor on the tiny Llama (greedy, dense and 4-bit with a nonzero LoRA adapter, one row and left-padded
rows). The penalty counts the reply's tokens, not the prompt's: transformers' processor with prompt_ignore_length
set to the prompt's length. Then: a row decoded in a batch gives its tokens decoded alone, the fallback through
transformers' generate gives the static decoder's text, the commands take the option (off by default), and values
outside (0, inf) are refused by name."""

from __future__ import annotations

import pytest
import torch

from pipeline_helpers import left_padded_rows, randomize_lora_b

from qlorakit.errors import OptionValueError, QlorakitError
from qlorakit.infer.decode import decode_tokens, penalize_repeats
from qlorakit.model.loader import load_model
from qlorakit.model.lora_inject import inject_lora

NEW = 16


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """About the decode loop, not the 4-bit kernels (tests/kernels compares those): the reference kernels."""
    monkeypatch.setenv("QLORAKIT_KERNELS", "reference")


def _model(tiny_model_dir, four_bit: bool):
    if four_bit:
        net, _ = load_model(tiny_model_dir, compute_dtype=torch.float32, progress=False)
        inject_lora(net, "all-linear", r=4, alpha=8, dropout=0.0)
        randomize_lora_b(net, 0.2, seed=2)
    else:
        from transformers import AutoModelForCausalLM

        net = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return net.eval()


def _ours(net, ids, mask, penalty: float) -> torch.Tensor:
    steps = decode_tokens(net, ids, mask, max_new_tokens=NEW, eos_ids=[-5], pad_id=0, repetition_penalty=penalty)
    return torch.stack(list(steps), dim=1)


def _transformers(net, ids, mask, penalty: float) -> torch.Tensor:
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    rule = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=ids.shape[1])
    out = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=0, do_sample=False,
                       logits_processor=LogitsProcessorList([rule]), eos_token_id=[net.config.vocab_size + 7],
                       pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.15, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_penalty_is_transformers_repetition_penalty_on_random_logits(penalty, dtype):
    from transformers import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(int(penalty * 100))
    batch, vocab, prompt, reply = 5, 97, 17, 23
    logits = (torch.randn(batch, vocab, generator=gen) * 4).to(dtype)
    logits[:, :3] = 0.0  # zero logits: transformers divides them (still zero), never multiplies
    ids = torch.randint(0, vocab, (batch, prompt + reply), generator=gen)
    ref = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt)(ids, logits.float().clone())
    seen = torch.zeros(batch, vocab, dtype=torch.bool).scatter_(1, ids[:, prompt:], True)
    kept = logits.clone()
    got = penalize_repeats(logits, seen, penalty)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref)
    assert torch.equal(logits, kept)  # the input is left as it was


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4+lora"])
@pytest.mark.parametrize("lengths", [[9], [6, 11, 3]], ids=["one-row", "left-padded"])
def test_penalized_greedy_tokens_equal_transformers_generate(tiny_model_dir, four_bit, lengths):
    net = _model(tiny_model_dir, four_bit)
    ids, mask = left_padded_rows(net.config.vocab_size, lengths)
    got = _ours(net, ids, mask, 1.3)
    assert torch.equal(got, _transformers(net, ids, mask, 1.3))
    assert not torch.equal(got, _ours(net, ids, mask, 1.0))  # the random model repeats itself; the penalty acts


def test_a_row_in_a_batch_gives_its_tokens_alone(tiny_model_dir):
    net = _model(tiny_model_dir, False)
    ids, mask = left_padded_rows(net.config.vocab_size, [6, 11, 3])
    together = _ours(net, ids, mask, 1.5)
    for i in range(ids.shape[0]):
        alone = ids[i:i + 1, mask[i].bool()]
        assert torch.equal(together[i], _ours(net, alone, torch.ones_like(alone), 1.5)[0])


def test_generate_through_transformers_gives_the_static_decoders_text(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from qlorakit.infer import decode
    from qlorakit.infer.generate import generate

    net = _model(tiny_model_dir, True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    static = generate(net, tok, "hello there", max_new_tokens=NEW, repetition_penalty=1.4)
    plain = generate(net, tok, "hello there", max_new_tokens=NEW)

    def refuse(model, max_len=2):
        raise QlorakitError("refused for this test")

    monkeypatch.setattr(decode.StaticDecoder, "check", staticmethod(refuse))
    fallback = generate(net, tok, "hello there", max_new_tokens=NEW, repetition_penalty=1.4)
    assert fallback == static != plain


@pytest.mark.parametrize("bad", [0, -1.2, float("nan"), float("inf"), True, "1.2", None])
def test_a_penalty_outside_its_range_is_refused_by_name(tiny_model_dir, bad):
    from qlorakit.infer.generate import stream_generate

    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(OptionValueError, match="--repetition-penalty .*allowed a finite number > 0"):
        next(decode_tokens(torch.nn.Linear(1, 1), ids, None, max_new_tokens=2, eos_ids=[], pad_id=0,
                           repetition_penalty=bad))
    with pytest.raises(OptionValueError, match="--repetition-penalty"):
        next(stream_generate(torch.nn.Linear(1, 1), None, "hi", repetition_penalty=bad))


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"], ["train", "run.yaml"]])
def test_the_commands_take_the_penalty(command):
    from qlorakit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(command).repetition_penalty == 1.0  # off unless asked for
    assert parser.parse_args(command + ["--repetition-penalty", "1.2"]).repetition_penalty == 1.2
