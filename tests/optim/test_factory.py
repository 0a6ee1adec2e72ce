"""Optimizer names, the training entry point, and what paging does on a machine without CUDA."""

from __future__ import annotations

import logging

import pytest
import torch

from qlorakit import logs
from qlorakit.optim import OPTIMIZERS, AdamW, OptimizerError, build_optimizer


@pytest.fixture
def fresh_messages(monkeypatch):
    monkeypatch.setattr(logs, "_said", set())


@pytest.mark.parametrize("name, bits, paged", [
    ("paged_adamw_32bit", 32, True), ("paged_adamw_8bit", 8, True), ("adamw_32bit", 32, False),
    ("adamw_8bit", 8, False), ("offload_adamw_32bit", 32, "pinned"), ("offload_adamw_8bit", 8, "pinned"),
])
def test_names_map_to_state_bits_and_paging(name, bits, paged):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer(name, [p], lr=2e-4, weight_decay=0.01, betas=(0.8, 0.95), eps=1e-6)
    assert isinstance(opt, AdamW) and opt.paged == paged
    group = opt.param_groups[0]
    assert (group["state_bits"], group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (
        bits, 2e-4, 0.01, (0.8, 0.95), 1e-6)


def test_every_config_name_is_known():
    from typing import get_args

    from qlorakit.config import TrainingSection

    config_names = get_args(TrainingSection.model_fields["optimizer"].annotation)
    assert config_names and set(config_names) == set(OPTIMIZERS)


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(OptimizerError, match="paged_adamw_8bit"):
        build_optimizer("adam8", [torch.nn.Parameter(torch.zeros(1))], lr=1e-3, weight_decay=0.0)


def test_paged_on_cpu_says_so_once_and_keeps_states_in_cpu_memory(caplog, fresh_messages):
    caplog.set_level(logging.WARNING, logger="qlorakit.optim")
    ps = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(10))]
    opt = build_optimizer("paged_adamw_8bit", ps, lr=1e-3, weight_decay=0.0)
    build_optimizer("offload_adamw_32bit", [torch.nn.Parameter(torch.randn(5000))], lr=1e-3, weight_decay=0.0)
    said = [r.getMessage() for r in caplog.records if "paged optimizer states need CUDA" in r.getMessage()]
    assert len(said) == 1 and "ordinary cpu memory" in said[0]
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state_bytes().keys() == {"cpu"} and opt.state[ps[0]]["exp_avg_codes"].device.type == "cpu"
    assert "CPU memory" in opt.describe() and "8-bit" in opt.describe()


def test_training_entry_point_builds_the_configured_optimizer(caplog):
    from qlorakit.config import config_from_dict
    from qlorakit.train.run import build_optimizer as build_for_training

    caplog.set_level(logging.INFO, logger="qlorakit.train")
    cfg = config_from_dict({"training": {"optimizer": "adamw_8bit", "learning_rate": 1e-4, "weight_decay": 0.1}})
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    model[0].weight.requires_grad_(False)
    opt = build_for_training(cfg, model)
    assert isinstance(opt, AdamW) and opt.param_groups[0]["state_bits"] == 8
    assert [tuple(p.shape) for p in opt.param_groups[0]["params"]] == [(64,), (4, 64), (4,)]
    assert any("adamw_8bit" in r.getMessage() and "states in" in r.getMessage() for r in caplog.records)
