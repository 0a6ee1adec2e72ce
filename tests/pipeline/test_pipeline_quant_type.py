"""`qlorakit train` measures a 4-bit type other than NF4 against NF4 on the model's weights before it loads it, and
warns once when it is worse by more than the margin (model/quant_type_check.py); an NF4 run says nothing of it."""

from __future__ import annotations

import logging

from pipeline_helpers import run_tree

from qlorakit.config import config_from_dict
from qlorakit.model.quant_type_check import compare_with_nf4
from qlorakit.train.run import run_training


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "quant_type" in r.getMessage()]


def test_an_fp4_run_warns_with_the_numbers_and_an_nf4_run_does_not(tiny_model_dir, pattern_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="qlorakit")
    expected = compare_with_nf4(tiny_model_dir, "fp4", 64)
    fp4 = run_tree(tiny_model_dir, pattern_data, tmp_path / "fp4", quantization={"quant_type": "fp4"},
                   training={"max_steps": 1})
    run_training(config_from_dict(fp4), progress=False)
    assert _warnings(caplog) == [f"qlorakit: warning: {expected.warning(str(tiny_model_dir))}"]
    first = next(i for i, r in enumerate(caplog.records) if r.name.startswith("qlorakit"))
    assert "quant_type fp4 fits this model's weights worse than nf4" in caplog.records[first].getMessage()
    assert expected.worse() and expected.sampled == expected.parameters  # a tiny model: every row

    caplog.clear()
    nf4 = run_tree(tiny_model_dir, pattern_data, tmp_path / "nf4", training={"max_steps": 1})
    run_training(config_from_dict(nf4), progress=False)
    assert _warnings(caplog) == [] and "quant_type" not in caplog.text
