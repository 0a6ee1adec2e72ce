"""Stopping and resuming: a run stopped after step k (as if killed), interrupted by Ctrl-C in the middle of a
step, or asked to stop by SIGTERM, then resumed, gives exactly the per-step losses and adapter of the run that
was never stopped, with LoRA dropout (RNG restored) and gradient accumulation."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from pipeline_helpers import run_tree, train_losses

from qlorakit.adapters.peft_format import lora_state_dict
from qlorakit.config import config_from_dict
from qlorakit.train import loop
from qlorakit.train.checkpoint import latest_checkpoint
from qlorakit.train.run import run_training

STEPS = 6


def _config(model_dir, data, out):
    tree = run_tree(model_dir, data, out, lora={"dropout": 0.1},
                    training={"max_steps": STEPS, "batch_size": 2, "gradient_accumulation": 2,
                              "learning_rate": 5e-3, "scheduler": "cosine", "warmup_ratio": 0.2})
    return config_from_dict(tree)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, pattern_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_training(_config(tiny_model_dir, pattern_data, out), progress=False)
    return out, lora_state_dict(result.model)


def _interrupt_on_call(monkeypatch, n: int, interrupt) -> None:
    """Make the n-th training forward pass (1-based, counting micro-batches, not eval) call interrupt()."""
    calls = {"n": 0}
    real = loop.forward_loss_sum

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == n:
                interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "forward_loss_sum", forward)


def _assert_same_as_uninterrupted(out, model, uninterrupted) -> None:
    ref_dir, ref_adapter = uninterrupted
    losses, ref = train_losses(out), train_losses(ref_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ref  # equal floats, step by step
    adapter = lora_state_dict(model)
    assert adapter.keys() == ref_adapter.keys()
    for key, tensor in adapter.items():
        assert torch.equal(tensor, ref_adapter[key]), key


def test_run_stopped_after_step_3_resumes_exactly(tiny_model_dir, pattern_data, tmp_path, uninterrupted):
    run = tmp_path / "run"
    cfg = _config(tiny_model_dir, pattern_data, run)
    first = run_training(cfg, progress=False, stop_after_steps=3)
    assert first.result.interrupted and first.result.steps == 3 and first.adapter_dir is None
    assert latest_checkpoint(run).name == "step-000003"

    second = run_training(cfg, progress=False)
    assert second.result.resumed_from == 3 and second.result.steps == STEPS and not second.result.interrupted
    _assert_same_as_uninterrupted(run, second.model, uninterrupted)


def test_ctrl_c_in_the_middle_of_a_step_saves_and_resumes_exactly(tiny_model_dir, pattern_data, tmp_path,
                                                                  uninterrupted, monkeypatch):
    def ctrl_c():
        raise KeyboardInterrupt

    run = tmp_path / "run"
    cfg = _config(tiny_model_dir, pattern_data, run)
    with monkeypatch.context() as patch:
        _interrupt_on_call(patch, 6, ctrl_c)  # the second micro-batch of step 3: steps 1 and 2 are complete
        first = run_training(cfg, progress=False)
    assert first.result.interrupted and first.result.steps == 2 and first.adapter_dir is None
    assert first.result.checkpoint == latest_checkpoint(run) and first.result.checkpoint.name == "step-000002"

    second = run_training(cfg, progress=False)
    assert second.result.resumed_from == 2 and second.result.steps == STEPS
    _assert_same_as_uninterrupted(run, second.model, uninterrupted)


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(tiny_model_dir, pattern_data, tmp_path,
                                                             uninterrupted, monkeypatch):
    run = tmp_path / "run"
    cfg = _config(tiny_model_dir, pattern_data, run)
    handler_before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        _interrupt_on_call(patch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))  # during step 2
        first = run_training(cfg, progress=False)
    assert first.result.interrupted and first.result.steps == 2
    assert latest_checkpoint(run).name == "step-000002"
    assert signal.getsignal(signal.SIGTERM) is handler_before

    second = run_training(cfg, progress=False)
    assert second.result.resumed_from == 2
    _assert_same_as_uninterrupted(run, second.model, uninterrupted)
