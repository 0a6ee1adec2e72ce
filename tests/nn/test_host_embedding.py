"""The input embedding table in host memory (model/host_embedding.py), on the CPU.

CI has no GPU, so the lookup's target device is the CPU here (`allow_cpu=True`): the same code path runs (host
table outside the model's parameters, lookup on the host, result `.to(device)`), only the copy is a no-op. Logits
and gradients of a tiny random Llama are bit-identical before and after the move; refusals leave the model as it
was; restore_embeddings gives back an nn.Embedding with the same values; dtype conversions of the model reach the
host table; hooks registered on the embedding (enable_input_require_grads) move with it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qlorakit.model.host_embedding import (
    HostEmbedding,
    host_embedding_bytes,
    move_embeddings_to_host,
    restore_embeddings,
)
from qlorakit.model.loader import buffers_to

VOCAB, HIDDEN = 97, 64
TINY = {"hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 0}


def _model(dtype: torch.dtype = torch.float32, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama on the CPU; everything trainable but the input embedding (frozen, as in QLoRA)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie))
    model.to(dtype).eval()
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_and_gradients_are_bit_identical(dtype):
    ids = _ids()
    ref = _model(dtype)
    want_logits, want_grads = _logits(ref, ids), _grads(ref, ids)

    model = _model(dtype)
    assert move_embeddings_to_host(model, allow_cpu=True) is None
    assert isinstance(model.get_input_embeddings(), HostEmbedding)
    assert torch.equal(_logits(model, ids), want_logits)
    grads = _grads(model, ids)
    assert grads.keys() == want_grads.keys() and "model.layers.0.self_attn.q_proj.weight" in grads
    for name, g in want_grads.items():
        assert torch.equal(grads[name], g), name


def test_table_leaves_the_parameters_and_state_dict_keeps_its_key():
    model = _model(torch.bfloat16)
    table = model.get_input_embeddings().weight.detach().clone()
    keys = list(model.state_dict())
    assert move_embeddings_to_host(model, allow_cpu=True) is None

    host = model.get_input_embeddings()
    assert (host.num_embeddings, host.embedding_dim, host.padding_idx) == (VOCAB, HIDDEN, 0)
    assert host.weight.dtype == torch.bfloat16 and host.weight.shape == (VOCAB, HIDDEN)
    assert not host.weight.requires_grad and torch.equal(host.weight, table)
    assert all(p is not host.weight for p in model.parameters())
    assert "model.embed_tokens.weight" not in dict(model.named_parameters())
    assert "model.embed_tokens.weight" not in dict(model.named_buffers())
    assert host_embedding_bytes(model) == VOCAB * HIDDEN * torch.bfloat16.itemsize

    state = model.state_dict()  # same keys as before the move; the table comes from the host
    assert list(state) == keys and torch.equal(state["model.embed_tokens.weight"], table)
    state = {k: v.clone() for k, v in state.items()}
    state["model.embed_tokens.weight"].fill_(1.5)
    model.load_state_dict(state, strict=True)
    assert torch.equal(host.weight, torch.full_like(table, 1.5))


def test_tied_embeddings_are_refused_and_left_alone():
    model = _model(tie=True)
    embed = model.get_input_embeddings()
    assert model.get_output_embeddings().weight is embed.weight
    ids = _ids()
    before = _logits(model, ids)

    reason = move_embeddings_to_host(model, allow_cpu=True)
    assert reason is not None and "tied" in reason and "\n" not in reason
    assert model.get_input_embeddings() is embed and type(embed) is nn.Embedding
    assert model.get_output_embeddings().weight is embed.weight
    assert host_embedding_bytes(model) == 0
    assert torch.equal(_logits(model, ids), before)


def test_other_refusals_change_nothing():
    model = _model()
    embed = model.get_input_embeddings()

    embed.weight.requires_grad_(True)
    reason = move_embeddings_to_host(model, allow_cpu=True)
    assert reason is not None and "requires_grad" in reason
    embed.weight.requires_grad_(False)

    reason = move_embeddings_to_host(model)  # the table is on the CPU already: nothing to gain by default
    assert reason is not None and "CPU" in reason

    class Scaled(nn.Embedding):
        def forward(self, input_ids):
            return super().forward(input_ids) * 2.0

    scaled = Scaled(VOCAB, HIDDEN)
    scaled.weight.requires_grad_(False)
    model.set_input_embeddings(scaled)
    reason = move_embeddings_to_host(model, allow_cpu=True)
    assert reason is not None and "Scaled" in reason
    assert model.get_input_embeddings() is scaled
    model.set_input_embeddings(embed)

    assert model.get_input_embeddings() is embed and host_embedding_bytes(model) == 0
    assert move_embeddings_to_host(model, allow_cpu=True) is None
    assert "already" in move_embeddings_to_host(model, allow_cpu=True)


def test_restore_gives_back_an_embedding_with_the_same_values():
    model = _model(torch.bfloat16)
    ids = _ids()
    table = model.get_input_embeddings().weight.detach().clone()
    before = _logits(model, ids)
    restore_embeddings(model)  # no HostEmbedding: a no-op
    assert type(model.get_input_embeddings()) is nn.Embedding

    assert move_embeddings_to_host(model, allow_cpu=True) is None
    restore_embeddings(model)
    embed = model.get_input_embeddings()
    assert type(embed) is nn.Embedding and embed.padding_idx == 0
    assert isinstance(embed.weight, nn.Parameter) and not embed.weight.requires_grad
    assert embed.weight.device == torch.device("cpu") and torch.equal(embed.weight, table)
    assert any(p is embed.weight for p in model.parameters())
    assert host_embedding_bytes(model) == 0
    assert torch.equal(_logits(model, ids), before)


def test_model_conversions_reach_the_host_table():
    ids = _ids()
    ref = _model(torch.bfloat16)
    model = _model(torch.bfloat16)
    assert move_embeddings_to_host(model, allow_cpu=True) is None

    # Device moves (here to the CPU, where it is already) and buffers_to leave the table a host attribute.
    model.to("cpu")
    buffers_to(model, torch.device("cpu"))
    host = model.get_input_embeddings()
    assert isinstance(host, HostEmbedding) and host.device == torch.device("cpu")
    assert all(p is not host.weight for p in model.parameters())

    # A dtype conversion converts the host table too, as it would an nn.Embedding's parameter.
    ref.to(torch.float32)
    model.to(torch.float32)
    assert host.weight.dtype == torch.float32 and host.weight.device.type == "cpu"
    assert host_embedding_bytes(model) == VOCAB * HIDDEN * 4
    assert torch.equal(host.weight, ref.get_input_embeddings().weight)
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
    model.half()
    assert host.weight.dtype == torch.float16


def test_hooks_move_with_the_embedding():
    """enable_input_require_grads (which activation checkpointing calls) hooks the input embedding; the hook
    still acts after the move, and its handle still removes it."""
    model = _model()
    model.enable_input_require_grads()
    assert move_embeddings_to_host(model, allow_cpu=True) is None
    host = model.get_input_embeddings()
    assert host(_ids()).requires_grad
    model.disable_input_require_grads()
    assert not host(_ids()).requires_grad

    model.enable_input_require_grads()
    restore_embeddings(model)
    assert model.get_input_embeddings()(_ids()).requires_grad


def test_head_on_host_gives_the_same_loss_and_gradients_and_restores():
    """The LM head kept in host memory: the training loss (decoder_loss_sum copies it in) and every trainable
    gradient are bit-identical; tied heads are refused; restore_head gives back the nn.Linear."""
    from qlorakit.model.host_embedding import HostHead, move_head_to_host, restore_head
    from qlorakit.train.loss import decoder_loss_sum

    ids = _ids()

    def loss_and_grads(model):
        model.get_output_embeddings().weight.requires_grad_(False)
        loss = decoder_loss_sum(model, {"input_ids": ids}, ids)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    ref, moved = _model(torch.bfloat16), _model(torch.bfloat16)
    ref.get_output_embeddings().weight.requires_grad_(False)
    moved.get_output_embeddings().weight.requires_grad_(False)
    want_loss, want_grads = loss_and_grads(ref)
    head_bytes = moved.get_output_embeddings().weight.numel() * 2
    assert move_head_to_host(moved) is not None  # on the CPU without allow_cpu: nothing to gain, refused
    assert move_head_to_host(moved, allow_cpu=True) is None
    assert isinstance(moved.get_output_embeddings(), HostHead)
    assert host_embedding_bytes(moved) == head_bytes
    assert "lm_head.weight" not in dict(moved.named_parameters())
    loss, grads = loss_and_grads(moved)
    assert torch.equal(loss, want_loss) and grads.keys() == want_grads.keys()
    assert all(torch.equal(grads[k], want_grads[k]) for k in grads)
    restore_head(moved)
    assert type(moved.get_output_embeddings()) is nn.Linear and host_embedding_bytes(moved) == 0
    assert torch.equal(_logits(moved, ids), _logits(ref, ids))
    tied = _model(tie=True)
    reason = move_head_to_host(tied, allow_cpu=True)
    assert reason is not None and "tie" in reason and type(tied.get_output_embeddings()) is nn.Linear
