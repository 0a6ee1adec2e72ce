"""The estimator and planner for layers whose activations wait in pinned host memory (training.
host_activations_gib, model/offload_saved.py): the host bytes equal what a tiny model's hosted layers move, the
GPU keeps two layers' worth in backward, and the planner hosts the layers it does not keep where host memory
holds them (and recomputes the rest)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from qlorakit.config import config_from_dict
from qlorakit.memory import estimate, plan
from qlorakit.model.fused_blocks import enable_fused_blocks, layer_activation_bytes
from qlorakit.model.lora_inject import enable_activation_checkpointing, inject_lora
from qlorakit.model.offload_saved import host_saved_activations
from qlorakit.model.synthetic import synthetic_llama

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 4, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
GiB = 2**30


def _dir(tmp_path, fields):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    return tmp_path


def _cfg(model_dir, rank=64, compute="bfloat16", **training):
    return config_from_dict({"model": {"name": str(model_dir)},
                             "quantization": {"compute_dtype": compute},
                             "lora": {"rank": rank, "alpha": 16, "target_modules": "all-linear"},
                             "training": {"gradient_checkpointing": True, **training}, "data": {"packing": False}})


class _Copies:
    def __init__(self):
        self.host = {}

    def to_host(self, key, t):
        self.host[key] = t.clone()

    def wait_stored(self, key):
        pass

    def start_reload(self, key):
        return self.host[key].clone()

    def finish_reload(self, pending):
        return pending


@pytest.mark.parametrize("min_bytes", [1, 1024], ids=["everything-moves", "small-tensors-stay"])
def test_host_bytes_equal_what_the_hosted_layers_move(tmp_path, monkeypatch, min_bytes):
    monkeypatch.setattr("qlorakit.model.offload_saved.MIN_BYTES", min_bytes)
    batch, seq, rank = 2, 24, 4
    model = synthetic_llama({k: v for k, v in TINY.items() if k not in ("architectures", "model_type")},
                            device="cpu", compute_dtype=torch.float32, seed=0, std=0.1)
    inject_lora(model, "all-linear", r=rank, alpha=8, dropout=0.0)
    enable_fused_blocks(model)
    enable_activation_checkpointing(model)
    for layer in model.model.layers:
        layer.mlp.keep_gate_up = False  # as the plan hosts them
    offload = host_saved_activations(model, [0, 1, 2, 3], _Copies())
    model.train()
    ids = torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    est = estimate(_cfg(_dir(tmp_path, TINY), rank=rank, compute="float32", batch_size=batch, max_seq_length=seq,
                        host_activations_gib=1.0), tmp_path)
    host = {c.key: c.nbytes for c in est.host}
    # the first layer's input is the frozen embeddings' output, which the model holds anyway; it moves all the same
    assert host["offloaded_activations"] == offload.moved_bytes > 0
    assert "4 layers kept in host memory" in est.notes[0]


def test_hosted_layers_leave_two_layers_on_the_gpu_in_backward(tmp_path):
    model_dir = _dir(tmp_path, LLAMA3_8B)
    tokens = 2048
    small, _ = layer_activation_bytes(type("C", (), {**LLAMA3_8B, "head_dim": 128})(), tokens)
    beyond = tokens * 2 * (4096 + 7 * 64)
    recompute = estimate(_cfg(model_dir, max_seq_length=tokens, batch_size=1), model_dir)
    hosted = estimate(_cfg(model_dir, max_seq_length=tokens, batch_size=1, host_activations_gib=4 * small / GiB + 0.01),
                      model_dir)
    # on the GPU: each hosted layer's x A^T products (256 KiB each, under MIN_BYTES), two fp32 rstd and the
    # log-sum-exp; in backward two layers' worth of reloaded tensors; nothing recomputed
    stays = 7 * tokens * 64 * 2 + 2 * 4 * tokens + 4 * 32 * tokens
    assert hosted.component("saved_activations") == 4 * stays
    host = {c.key: c.nbytes for c in hosted.host}
    assert host["offloaded_activations"] == 4 * (small + beyond - stays)
    assert hosted.component("layer_working_set") < recompute.component("layer_working_set") + 2 * (small + beyond)
    assert "0 recomputed layers' inputs, 4 layers kept in host memory" in hosted.notes[0]


def test_the_planner_hosts_what_it_does_not_keep_where_host_memory_holds_it(tmp_path):
    model_dir = _dir(tmp_path, {**LLAMA3_8B, "num_hidden_layers": 8})
    cfg = _cfg(model_dir, max_seq_length=2048, batch_size=1, optimizer="host_adamw_32bit", max_grad_norm=None)
    lean = estimate(_cfg(model_dir, max_seq_length=2048, batch_size=1, optimizer="host_adamw_32bit",
                         max_grad_norm=None, offload_activations=True), model_dir)
    budget = lean.device_peak / GiB + 0.5
    plenty = plan(cfg, model_dir, budget, host_free=64 * GiB)
    t = plenty.config.training
    layers = plenty.estimate.notes[0]
    assert t.host_activations_gib > 0 and "0 recomputed layers' inputs" in layers and "host memory" in layers
    assert plenty.estimate.device_peak <= budget * GiB
    assert "host_activations_gib=" in plenty.line()
    none = plan(cfg, model_dir, budget, host_free=0)  # no host memory to pin: the layers not kept are recomputed
    assert none.config.training.host_activations_gib == 0 and "recomputed layers' inputs" in none.estimate.notes[0]
    # room for one and a half layers' activations beside the optimizer states: of the layers the budget does not
    # keep on the GPU, one is hosted and the others are recomputed
    every = estimate(_cfg(model_dir, max_seq_length=2048, batch_size=1, optimizer="host_adamw_32bit",
                          max_grad_norm=None, offload_activations=True, host_activations_gib=100.0), model_dir)
    per_layer = {c.key: c.nbytes for c in every.host}["offloaded_activations"] / 8
    others = sum(c.nbytes for c in every.host if c.key not in ("offloaded_activations", "loading"))
    some = plan(cfg, model_dir, budget, host_free=int(2 * (others + 1.5 * per_layer)))
    notes = some.estimate.notes[0]
    assert ", 1 layer kept in host memory" in notes and "2 recomputed layers' inputs" in notes, notes
    assert importlib.import_module("qlorakit.memory.plan").HOST_SHARE == 0.5


def test_host_activations_need_checkpointing():
    from qlorakit.errors import QloraConfigError

    with pytest.raises(QloraConfigError, match="host_activations_gib needs gradient_checkpointing"):
        config_from_dict({"model": {"name": "x"}, "training": {"gradient_checkpointing": False,
                                                               "host_activations_gib": 1.0}})


@pytest.mark.parametrize("dense_copies", [False, True], ids=["fused-layers", "dense-copies"])
def test_a_cpu_run_asked_to_host_says_why_not_and_trains_the_same(tiny_model_dir, pattern_data, tmp_path, caplog,
                                                                   dense_copies):
    """On a CPU there is no host link to cross: with fused layers (no dense weight copies) those the plan would
    host keep their activations where they are; with a CPU run's dense copies no layer is fused, so none can be
    hosted. Either way the log says why, once, and the losses equal a run that recomputes every layer."""
    import logging

    from pipeline_helpers import run_tree

    from qlorakit.train.run import run_training

    def tree(name, **training):
        return config_from_dict(run_tree(tiny_model_dir, pattern_data, tmp_path / name,
                                         model={"name": str(tiny_model_dir), "cpu_dense_copies": dense_copies},
                                         training={"max_steps": 2, "gradient_checkpointing": True, **training}))

    plain = run_training(tree("plain"), progress=False)
    with caplog.at_level(logging.INFO, logger="qlorakit.train"):
        hosted = run_training(tree("hosted", host_activations_gib=1.0), progress=False)
    why = ("no layer keeps its activations in host memory: only fully fused Llama decoder layers can" if dense_copies
           else "host_activations_gib needs a CUDA device")
    said = [r.getMessage() for r in caplog.records if "host_activations_gib" in r.getMessage()
            and r.levelno == logging.WARNING]
    assert len(said) == 1 and why in said[0], said
    assert hosted.result.losses == plain.result.losses and len(plain.result.losses) == 2


def test_a_preference_objective_counts_both_rows_of_each_pair(tmp_path):
    model_dir = _dir(tmp_path, LLAMA3_8B)
    dpo = estimate(_cfg(model_dir, max_seq_length=1024, batch_size=2, objective="dpo"), model_dir)
    sft = estimate(_cfg(model_dir, max_seq_length=1024, batch_size=4), model_dir)
    for key in ("saved_activations", "layer_working_set", "loss_chunk"):
        assert dpo.component(key) == sft.component(key), key
