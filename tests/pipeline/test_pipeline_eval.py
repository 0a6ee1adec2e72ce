"""`qlorakit eval --config RUN/config.yaml` scores the run's held-out examples as the run itself did: the trained
adapter on the NF4 base it was trained on gives the run's last eval loss, over the same target tokens, and the NF4
base alone the run's eval before training (its LoRA B matrices were still zero then)."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import read_events

from qlorakit import cli

# The run evaluated packed rows (a block-diagonal mask, several examples a row), eval one example a row: the same
# fp32 computation with sums in another order, so a few fp32 ulps per token (see tests/eval/test_eval_command.py).
LOSS_RTOL = 1e-6


def test_eval_of_the_runs_held_out_examples_is_the_runs_own_eval(tiny_model_dir, trained_run, tmp_path):
    run = trained_run.run_dir
    evals = read_events(run, "eval")
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", f"trained={tiny_model_dir}+{run / 'adapter'}", "--model",
                     f"base={tiny_model_dir}:nf4", "--config", str(run / "config.yaml"), "--device", "cpu",
                     "--no-progress", "--json-path", str(out)]) == 0
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["data"].endswith("held out by config.yaml")
    for name, expected in (("trained", evals[-1]), ("base", evals[0])):
        data = saved["models"][name]["data"]
        assert data["tokens"] == expected["eval_tokens"], name
        assert data["loss"] == pytest.approx(expected["eval_loss"], rel=LOSS_RTOL), name
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
