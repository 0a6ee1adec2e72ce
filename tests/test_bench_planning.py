"""The GPU benchmarks' planning step, which needs no GPU: benchmarks/train_step.py --budget-from-peer and
benchmarks/dpo_step.py --budget-from-peer turn a peer's measured peaks into the plan `training.memory_budget_gib`
makes (bench_common.plan_within, the estimate from config.json alone) and into the settings they then measure.
Checked here: the budget is the peer's NVML peak, the torch bound 2% under its torch peak, the plan's estimate
within both, and the command-line choices are the plan's; a peer without a result plans nothing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_common  # noqa: E402

# Peaks of the kind the peers measured on an H100 (Unsloth at 1 x 2048, TRL's DPO at 1 and 4 pairs of 2 x 1024).
UNSLOTH_B1 = {"torch_peak_GiB": 7.15, "nvml_peak_GiB": 10.80}
TRL_DPO = {"P1xT1024": {"torch_peak_GiB": 6.77, "nvml_peak_GiB": 9.64},
           "P4xT1024": {"torch_peak_GiB": 9.65, "nvml_peak_GiB": 14.57}}


@pytest.fixture(autouse=True)
def _allocator_setting_untouched(monkeypatch):
    """The scripts set PYTORCH_CUDA_ALLOC_CONF when imported (if unset): it goes again after each test."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


@pytest.fixture(autouse=True)
def _host_memory_fixed(monkeypatch):
    """The planner pins at most half of the host's MemAvailable for activations, which moves between two calls
    (at 4 pairs that cap decides how many layers are hosted): fixed at the GPU machines' 128 GiB, so a plan made
    twice is the same plan."""
    import importlib

    monkeypatch.setattr(importlib.import_module("qlorakit.memory.plan"), "host_available_bytes", lambda: 128 * 2**30)


def test_train_step_plans_within_the_peer_peaks_and_takes_the_plan_choices():
    import train_step

    args = argparse.Namespace(batches="1x2048", budget_from_peer="unsloth", shape="llama3-8b", layers=0, rank=64,
                              dropout=0.0, optimizer="paged_adamw_32bit")
    plan = train_step.plan_from_peer(args, {"unsloth": {"B1xT2048": UNSLOTH_B1}})
    assert plan["budget_gib"] == UNSLOTH_B1["nvml_peak_GiB"]
    assert plan["torch_budget_gib"] == round(0.98 * UNSLOTH_B1["torch_peak_GiB"], 3)
    assert plan["estimate_torch_GiB"] <= plan["torch_budget_gib"]
    assert plan["estimate_device_GiB"] <= plan["budget_gib"]
    changes = plan["changes"]
    assert args.keep == f"1x2048={changes.get('training.keep_activations_gib', 0.0)}"
    assert args.offload == ("only" if changes.get("training.offload_activations") else "")
    assert args.host_activations == changes.get("training.host_activations_gib", 0.0)
    assert args.embeddings_on_host == changes.get("training.embeddings_on_host", False)
    assert args.unstacked_dequant == (changes.get("training.stacked_dequant") is False)
    with pytest.raises(SystemExit, match="no unsloth result for B1xT2048"):
        train_step.plan_from_peer(args, {"unsloth": {"error": "needs CUDA"}})


def test_dpo_step_measures_the_keep_values_and_the_plan_per_pairs_count(monkeypatch, capsys):
    import dpo_step

    monkeypatch.setattr(dpo_step, "DEV", "cuda")  # a plan is made for GPU runs only; nothing here touches CUDA
    args = argparse.Namespace(keep=[0.0], budget_from_peer=True, seq=1024, prompt=256, shape="llama3-8b", layers=0,
                              rank=64, adapter_dtype="bfloat16")
    for pairs, key, shared in ((1, "P1xT1024", False), (4, "P4xT1024", False), (1, "P1xT1024", True),
                               (4, "P4xT1024", True)):
        settings = dpo_step.settings_for(args, pairs, TRL_DPO, shared)
        assert [s["name"] for s in settings] == ["keep0", "plan"]
        plan = settings[1]
        assert plan["budget_GiB"] == TRL_DPO[key]["nvml_peak_GiB"]
        assert plan["torch_budget_GiB"] == round(0.98 * TRL_DPO[key]["torch_peak_GiB"], 3)
        assert plan["estimate_torch_GiB"] <= plan["torch_budget_GiB"]
        assert plan["estimate_device_GiB"] <= plan["budget_GiB"]
        rows, seq = (pairs, 2 * 1024 - 256) if shared else (2 * pairs, 1024)  # a pair's row with its prompt once
        direct = bench_common.plan_within("llama3-8b", 0, rows, seq, plan["budget_GiB"],
                                          plan["torch_budget_GiB"], rank=64, dropout=0.0,
                                          optimizer="paged_adamw_32bit", adapter_dtype="bfloat16")
        assert plan["changes"] == direct.changes
        assert plan["keep"] == direct.config.training.keep_activations_gib
        assert plan["host"] == direct.config.training.host_activations_gib
    assert [s["name"] for s in dpo_step.settings_for(args, 2, TRL_DPO, True)] == ["keep0"]
    assert "no peer result at P2xT1024" in capsys.readouterr().out
