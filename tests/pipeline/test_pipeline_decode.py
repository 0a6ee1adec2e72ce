"""The static-cache decoder (infer/decode.py) against transformers' own `generate`: the same greedy tokens on the
tiny Llama in float32 (dense, and 4-bit with a nonzero LoRA adapter), one row and left-padded rows of different
lengths, sdpa and eager attention; the end-of-sequence handling; and `qlorakit generate`'s streamed text equal to
the decoded tokens. On this CPU the loop runs eagerly; on a GPU the same step is replayed as a CUDA graph
(benchmarks/decode.py checks that the graph gives these tokens too)."""

from __future__ import annotations

import pytest
import torch

from pipeline_helpers import left_padded_rows, randomize_lora_b

from qlorakit.errors import QlorakitError
from qlorakit.infer.decode import StaticDecoder, choose_next, decode_tokens
from qlorakit.infer.slots import SlotDecoder, greedy_joins
from qlorakit.model.loader import load_model
from qlorakit.model.lora_inject import inject_lora

NEW = 12


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """These tests are about the decode loop, not the 4-bit kernels (tests/kernels compares those): they run the
    reference even in CI's Triton pass, where the interpreter would take minutes per one-row decode."""
    monkeypatch.setenv("QLORAKIT_KERNELS", "reference")


def _model(tiny_model_dir, attn: str, four_bit: bool):
    if four_bit:
        net, _ = load_model(tiny_model_dir, compute_dtype=torch.float32, attn_implementation=attn, progress=False)
        inject_lora(net, "all-linear", r=4, alpha=8, dropout=0.0)
        randomize_lora_b(net, 0.2, seed=2)
    else:
        from transformers import AutoModelForCausalLM

        net = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    return net.eval()


def _hf_greedy(net, ids, mask, eos: list[int], pad: int) -> torch.Tensor:
    out = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=0, do_sample=False,
                       eos_token_id=eos, pad_token_id=pad)
    return out[:, ids.shape[1]:]


def _ours(net, ids, mask, eos: list[int], pad: int) -> torch.Tensor:
    steps = list(decode_tokens(net, ids, mask, max_new_tokens=NEW, eos_ids=eos, pad_id=pad))
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4+lora"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [[7], [5, 9, 3]], ids=["one-row", "left-padded"])
def test_greedy_tokens_equal_transformers_generate(tiny_model_dir, attn, four_bit, lengths):
    net = _model(tiny_model_dir, attn, four_bit)
    ids, mask = left_padded_rows(net.config.vocab_size, lengths)
    no_eos = [-5]  # never produced: every row runs the full length
    ref = _hf_greedy(net, ids, mask, [net.config.vocab_size + 7], pad=0)
    got = _ours(net, ids, mask, no_eos, pad=0)
    assert ref.shape == got.shape == (len(lengths), NEW)
    assert torch.equal(got, ref)


def test_rows_stop_at_their_end_token_and_are_padded_after_it(tiny_model_dir):
    net = _model(tiny_model_dir, "sdpa", False)
    ids, mask = left_padded_rows(net.config.vocab_size, [6, 4])
    free = _ours(net, ids, mask, [-5], pad=0)
    eos = int(free[0, 2])  # row 0's third token becomes its end token
    got = _ours(net, ids, mask, [eos], pad=0)
    ref = _hf_greedy(net, ids, mask, [eos], pad=0)
    first = int((free[0] == eos).nonzero()[0])
    assert torch.equal(got[0, :first + 1], free[0, :first + 1])
    assert (got[0, first + 1:] == 0).all()  # padded after its end token
    assert torch.equal(got, ref[:, :got.shape[1]])  # transformers agrees, up to where every row has ended
    if got.shape[1] < NEW:
        assert all(bool((row == eos).any()) for row in got)  # it stopped early only because every row ended


def test_the_decoder_refuses_what_it_cannot_run(tiny_model_dir):
    net = _model(tiny_model_dir, "sdpa", False)
    net.config._attn_implementation = "flash_attention_2"
    with pytest.raises(QlorakitError, match="flash_attention_2"):
        StaticDecoder.check(net)
    net.config._attn_implementation = "sdpa"
    dec = StaticDecoder(net, batch=1, max_len=4, graphs=False)
    with pytest.raises(QlorakitError, match="4 positions"):
        dec.prefill(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(QlorakitError, match="CUDA"):
        StaticDecoder(net, batch=1, max_len=4, graphs=True)


def test_sampling_is_seeded_and_keeps_to_the_nucleus():
    logits = torch.tensor([[4.0, 3.9, -10.0, -10.0]] * 64)
    a = choose_next(logits, 1.0, 0.9, torch.Generator().manual_seed(3))
    b = choose_next(logits, 1.0, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert set(a.tolist()) <= {0, 1} and len(set(a.tolist())) == 2  # both nucleus tokens, nothing outside
    top = choose_next(logits, 1.0, 0.1, torch.Generator().manual_seed(3))
    assert (top == 0).all()  # a nucleus of one token
    assert (choose_next(logits, 0.0, 1.0, None) == 0).all()  # temperature 0: greedy


def test_generate_streams_the_decoded_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    from qlorakit.infer.generate import _eos_ids, generate, render_prompt

    net = _model(tiny_model_dir, "sdpa", True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pieces: list[str] = []

    class Sink:
        def write(self, s):
            pieces.append(s)

        def flush(self):
            pass

    text = generate(net, tok, "hello there", max_new_tokens=NEW, stream=Sink())
    assert text == "".join(pieces)
    enc = tok(render_prompt(tok, "hello there"), return_tensors="pt", add_special_tokens=False)
    eos = _eos_ids(net, tok)
    ref = _hf_greedy(net, enc["input_ids"], enc["attention_mask"], eos, pad=tok.pad_token_id)[0].tolist()
    ref = ref[:ref.index(eos[0])] if eos[0] in ref else ref
    assert text == tok.decode(ref, skip_special_tokens=True)


def test_the_loader_leaves_no_buffer_behind_on_another_device(tiny_model_dir):
    """RoPE's inv_freq is computed by the architecture on the CPU; a model loaded for a GPU must have it there
    too (else every forward copies it host-to-device, which a CUDA graph cannot capture). Checked with the
    loader's buffer move towards the meta device, the one other device this machine has."""
    from qlorakit.model.loader import buffers_to

    net, _ = load_model(tiny_model_dir, compute_dtype=torch.float32, progress=False)
    names = [n for n, b in net.named_buffers() if b is not None]
    assert any("inv_freq" in n for n in names)
    assert buffers_to(net, torch.device("cpu")) == 0  # loaded for the CPU: all there already
    moved = buffers_to(net, torch.device("meta"))
    assert moved == len(names)
    assert all(b.device.type == "meta" for _, b in net.named_buffers() if b is not None)


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4+lora"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_joining_the_slot_cache_mid_decode_equal_each_row_decoded_alone(tiny_model_dir, attn, four_bit):
    """Continuous batching's cache (infer/slots.py): prompt 0 starts alone in slot 2; prompts 1 and 2 join
    together three steps later (one left-padded prefill) into slots 0 and 3; prompt 3 takes slot 2 once prompt 0
    has left it (its old keys must not leak). Every prompt's greedy tokens equal decode_tokens of that prompt
    alone: rows do not see each other's prompts, lengths or positions."""
    net = _model(tiny_model_dir, attn, four_bit)
    lengths = [7, 3, 11, 5]
    ids, mask = left_padded_rows(net.config.vocab_size, lengths)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    alone = [torch.stack(list(decode_tokens(net, torch.tensor([p]), None, max_new_tokens=NEW, eos_ids=[-5],
                                            pad_id=0)), dim=1)[0].tolist() for p in prompts]
    dec = SlotDecoder(net, slots=4, width=32, graphs=False)
    joins = {0: [(0, 2)], 3: [(1, 0), (2, 3)], NEW + 1: [(3, 2)]}
    logits: dict[int, list[torch.Tensor]] = {}
    got = greedy_joins(dec, prompts, joins, NEW, record=logits)
    assert [got[i] for i in range(4)] == alone
    assert all(len(logits[i]) == NEW and [int(r.argmax()) for r in logits[i]] == got[i] for i in range(4))
    # teacher forcing (benchmarks/serve_slots_check.py): the forced tokens go in, and the same logits come out
    forced = {i: [(t + 1) % net.config.vocab_size for t in got[i]] for i in range(4)}
    again: dict[int, list[torch.Tensor]] = {}
    fed = greedy_joins(SlotDecoder(net, slots=4, width=32, graphs=False), prompts, joins, NEW, forced, again)
    assert fed == forced
    assert all(torch.equal(again[i][0], logits[i][0]) for i in range(4))  # the prefill's: before any forced token
    assert not all(torch.equal(again[i][1], logits[i][1]) for i in range(4))  # then other inputs, other logits
