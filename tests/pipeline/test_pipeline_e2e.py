"""A YAML config run end to end through `qlorakit train`, and the other tested architectures."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import ARCHITECTURES, LINEARS_PER_LAYER, NUM_LAYERS, read_events, run_tree, save_tiny_model

from qlorakit.config import config_from_dict
from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.train.run import run_training


def test_yaml_run_writes_adapter_metrics_plot_and_summary(trained_run):
    assert trained_run.exit_code == 0
    run = trained_run.run_dir
    adapter = run / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                   "qlorakit_adapter.json"}
    train, evals = read_events(run, "train"), read_events(run, "eval")
    assert [r["step"] for r in train] == list(range(1, 11))
    assert [r["step"] for r in evals] == [0, 5, 10]
    assert (run / "loss.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["adapter"] == str(adapter)
    record = json.loads((adapter / "qlorakit_adapter.json").read_text())
    assert record["training"]["steps"] == 10 and len(record["base_fingerprint"]) == 64
    # --set overrode the YAML file, and the run recorded the config it used
    assert "batch_size: 4" in (run / "config.yaml").read_text()


def test_yaml_run_eval_loss_falls_on_a_learnable_pattern(trained_run):
    losses = [r["eval_loss"] for r in read_events(trained_run.run_dir, "eval")]
    assert losses[1] < losses[0] and losses[2] < losses[1]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "llama"])
def test_architecture_loads_quantized_and_trains(arch, pattern_data, tmp_path):
    model_dir = save_tiny_model(tmp_path / arch, arch)
    cfg = config_from_dict(run_tree(model_dir, pattern_data, tmp_path / "run", training={"max_steps": 2}))
    out = run_training(cfg, progress=False)
    assert type(out.model).__name__.lower().startswith(arch)
    assert sum(isinstance(m, Linear4bit) for m in out.model.modules()) == LINEARS_PER_LAYER * NUM_LAYERS
    q_proj = out.model.get_decoder().layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, Linear4bit) and (q_proj.bias is not None) == (arch == "qwen2")
    assert out.result.steps == 2 and all(loss == loss for loss in out.result.losses)
    assert (out.adapter_dir / "adapter_model.safetensors").is_file()
