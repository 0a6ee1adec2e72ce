"""Each pair's prompt run once (train/shared_prompt.py) against TRL's layout, where every prompt runs twice.

The shared row [prompt | chosen | rejected] must give the same response log-probs, ORPO's NLL, reference
log-probs and LoRA gradients as the two classic rows (fp32 on a CPU: within 1e-5 relative, the prompt's two
gradient contributions being summed in another order), for pairs of different prompt and response lengths and
through the training step (preference_step.micro_batch_loss). And the layout itself: the rows, positions,
column map and mask, and where it is not taken (with the reason said once).
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qlorakit.data.pair_examples import PairExamples
from qlorakit.model.lora_inject import inject_lora
from qlorakit.train import shared_prompt
from qlorakit.train.preference import PreferenceSettings, preference_loss, reference_logps, sequence_logps
from qlorakit.train.shared_prompt import CHOSEN, PADDING, PROMPT, REJECTED, layout_for, shared_layout

RTOL = 1e-5
VOCAB = 61


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= rtol * max(float(b.abs().max()), 1e-30))


def _pairs(lengths: list[tuple[int, int, int]], seed: int = 0) -> PairExamples:
    g = np.random.default_rng(seed)
    return PairExamples.from_pairs([(g.integers(3, VOCAB, p).tolist(), g.integers(3, VOCAB, c).tolist(),
                                     g.integers(3, VOCAB, r).tolist(), i) for i, (p, c, r) in enumerate(lengths)])


def _model(attn: str = "sdpa") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=False, attn_implementation=attn)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.requires_grad_(False)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # the policy differs from its reference (the adapters off)
    return model


LENGTHS = [(5, 3, 7), (2, 6, 1), (9, 4, 4), (1, 2, 3)]  # prompt, chosen, rejected tokens


def test_layout_rows_positions_columns_and_mask():
    batch = _pairs(LENGTHS[:2]).collate([[0], [1]], pad_id=0)
    lay = shared_layout(batch)
    assert lay is not None and lay.input_ids.shape == (2, 15)  # 5 + 3 + 7 = 15 and 2 + 6 + 1 = 9, padded
    ids = batch["input_ids"]
    assert torch.equal(lay.input_ids[0, :15], torch.cat([ids[0, :8], ids[2, 5:12]]))
    assert torch.equal(lay.input_ids[1, :9], torch.cat([ids[1, :8], ids[3, 2:3]]))
    assert lay.position_ids[0].tolist() == [*range(8), *range(5, 12)]
    assert lay.position_ids[1, :9].tolist() == [*range(8), 2]
    assert lay.segments[1].tolist() == [PROMPT] * 2 + [CHOSEN] * 6 + [REJECTED] + [PADDING] * 6
    # every attended position of TRL's layout reads the same token in the shared row
    for b in range(4):
        n = int(batch["attention_mask"][b].sum())
        assert torch.equal(lay.input_ids[b % 2, lay.col[b, :n]], ids[b, :n])
    allowed = lay.mask(torch.float32)[:, 0] == 0
    assert allowed[0, 8, :5].all() and not allowed[0, 8, 5:8].any() and allowed[0, 8, 8]  # rejected: prompt, self
    assert allowed[0, 7, :8].all() and not allowed[0, 7, 8:].any()  # chosen: prompt and itself, causal
    assert not allowed[1, :9, 9:].any()  # padding keys are seen by no real query; a padding query sees itself
    assert allowed[1, 12].nonzero().flatten().tolist() == [12]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_log_probs_and_gradients_equal_trls_layout(attn):
    model = _model(attn)
    batch = _pairs(LENGTHS, seed=1).collate([[i] for i in range(len(LENGTHS))], pad_id=0)
    lay = layout_for(model, batch, torch.float32)
    assert lay is not None and lay.tokens < batch["input_ids"].numel()
    results = []
    for layout in (None, lay):
        model.zero_grad(set_to_none=True)
        ref = reference_logps(model, batch, layout=layout)
        pol = sequence_logps(model, batch, with_nll=True, layout=layout)
        loss, _ = preference_loss(PreferenceSettings("dpo"), pol, ref)
        (loss + pol.nll).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((ref, pol, grads))
    (ref0, pol0, g0), (ref1, pol1, g1) = results
    for a, b in ((pol1.chosen, pol0.chosen), (pol1.rejected, pol0.rejected), (ref1.chosen, ref0.chosen),
                 (ref1.rejected, ref0.rejected), (pol1.nll, pol0.nll)):
        assert _close(a, b), (a, b)
    assert torch.equal(pol1.chosen_tokens, pol0.chosen_tokens) and torch.equal(pol1.rejected_tokens,
                                                                                pol0.rejected_tokens)
    assert not _close(ref0.chosen, pol0.chosen, 1e-3)  # the adapters change the log-probs: a real comparison
    assert sorted(g1) == sorted(g0) and len(g0) > 0
    for n in g0:
        assert _close(g1[n], g0[n]), n


def test_the_training_step_shares_prompts_and_matches_unshared(monkeypatch):
    from qlorakit.train.preference_step import micro_batch_loss
    from qlorakit.train.runtime import Runtime

    model = _model()
    batch = _pairs(LENGTHS, seed=2).collate([[i] for i in range(len(LENGTHS))], pad_id=0)
    runtime = Runtime(device=torch.device("cpu"), compute_dtype=torch.float32, adapter_dtype=torch.float32)
    seen = []
    real = shared_prompt.SharedLayout.mask
    monkeypatch.setattr(shared_prompt.SharedLayout, "mask", lambda self, dtype: seen.append(self) or real(self, dtype))
    out = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        loss, metrics = micro_batch_loss(model, batch, runtime, PreferenceSettings("dpo", share_prompts=share))
        loss.backward()
        out.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}))
    assert len(seen) == 2  # shared: the reference forward and the policy forward, and only then
    assert _close(out[1][0], out[0][0])
    assert out[1][1]["rewards/accuracies"] == out[0][1]["rewards/accuracies"]
    for n in out[0][2]:
        assert _close(out[1][2][n], out[0][2][n]), n


def test_where_the_layout_is_not_taken(caplog):
    batch = _pairs(LENGTHS[:2]).collate([[0], [1]], pad_id=0)
    with caplog.at_level(logging.WARNING):
        flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))  # what's read
        assert layout_for(flash, batch, torch.float32) is None
    assert "attention 'flash_attention_2' takes no 4-D mask" in caplog.text
    no_prompt = _pairs([(1, 3, 4), (0, 2, 2)]).collate([[0], [1]], pad_id=0)
    assert shared_layout(no_prompt) is None  # nothing to share
    left = {k: v.flip(1) for k, v in batch.items()}  # left-padded rows: not this layout
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert shared_layout(left) is None
    assert "not each prompt, then one response, then right padding" in caplog.text


def test_mask_size_limit_and_mismatched_prompts(monkeypatch, caplog):
    model = _model()
    batch = _pairs(LENGTHS[:2]).collate([[0], [1]], pad_id=0)
    monkeypatch.setattr(shared_prompt, "MASK_LIMIT_BYTES", 2 * 15 * 15 * 4 - 1)  # one byte short
    with caplog.at_level(logging.WARNING):
        assert layout_for(model, batch, torch.float32) is None
    assert "the shared-prompt mask would take" in caplog.text and "over the 0 MiB limit" in caplog.text
    monkeypatch.setattr(shared_prompt, "MASK_LIMIT_BYTES", 2 * 15 * 15 * 4)
    assert layout_for(model, batch, torch.float32) is not None
    bad = copy.deepcopy(batch)
    bad["input_ids"][2, 1] = (bad["input_ids"][2, 1] + 1) % VOCAB
    with pytest.raises(ValueError, match="pair 0 of a preference batch: its chosen and rejected rows start"):
        shared_layout(bad)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_blocks_attend_in_trls_layout_and_match_it(monkeypatch, checkpointing):
    """The fused attention (sdpa) gathers the shared rows into TRL's layout (model/shared_attention.py) instead of
    reading the mask: the same log-probs and gradients, with the layers recomputed in backward or not."""
    from qlorakit.model import fused_blocks
    from qlorakit.model.lora_inject import enable_activation_checkpointing
    from qlorakit.model.synthetic import synthetic_llama

    monkeypatch.setenv("QLORAKIT_KERNELS", "reference")  # the wiring; the kernels are tested in tests/kernels
    tiny = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
    model = synthetic_llama(tiny, device="cpu", compute_dtype=torch.float32, std=0.1)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    fused = fused_blocks.enable_fused_blocks(model)
    assert fused is not None and "2 decoder layers" in fused.line()
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    calls = []
    real = fused_blocks.attend_rows
    monkeypatch.setattr(fused_blocks, "attend_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = _pairs([(6, 9, 5), (11, 4, 8)], seed=3).collate([[0], [1]], pad_id=0)  # 17+ rows: the fused path
    lay = layout_for(model, batch, torch.float32)
    results = []
    for layout in (None, lay):
        model.zero_grad(set_to_none=True)
        ref = reference_logps(model, batch, layout=layout)
        pol = sequence_logps(model, batch, layout=layout)
        loss, _ = preference_loss(PreferenceSettings("dpo"), pol, ref)
        loss.backward()
        results.append((ref, pol, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == 2 * 2 + (2 if checkpointing else 0)  # reference and policy forwards, recomputes
    (ref0, pol0, g0), (ref1, pol1, g1) = results
    for a, b in ((pol1.chosen, pol0.chosen), (pol1.rejected, pol0.rejected), (ref1.chosen, ref0.chosen),
                 (ref1.rejected, ref0.rejected)):
        assert _close(a, b), (a, b)
    assert not _close(ref0.chosen, pol0.chosen, 1e-3)
    assert sorted(g1) == sorted(g0) and len(g0) == 2 * 7 * 2
    for n in g0:
        assert _close(g1[n], g0[n]), n
