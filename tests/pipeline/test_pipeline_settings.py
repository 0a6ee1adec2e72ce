"""Process-wide settings a training run takes from its config: `model.kernels` reaches the dispatch point for
the run and the process's choice comes back after it; `model.cpu_dense_copies: false` keeps only 4-bit weights."""

from __future__ import annotations

from pipeline_helpers import run_tree

from qlorakit.config import config_from_dict
from qlorakit.kernels import dispatch
from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.train import loop
from qlorakit.train.run import run_training


def test_model_kernels_is_in_force_during_the_run_and_given_back(tiny_model_dir, pattern_data, tmp_path,
                                                                 monkeypatch):
    monkeypatch.delenv("QLORAKIT_KERNELS", raising=False)
    seen = []
    real = loop.forward_loss_sum

    def spy(*args, **kwargs):
        seen.append(dispatch.requested_backend())
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "forward_loss_sum", spy)
    tree = run_tree(tiny_model_dir, pattern_data, tmp_path / "run", model={"kernels": "reference"},
                    training={"max_steps": 1})
    before = dispatch.set_backend("auto")
    try:
        run_training(config_from_dict(tree), progress=False)
        assert seen and set(seen) == {"reference"} and dispatch.requested_backend() == "auto"
    finally:
        dispatch.set_backend(before)


def test_cpu_dense_copies_false_keeps_only_the_4bit_weights(tiny_model_dir, pattern_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="qlorakit")
    tree = run_tree(tiny_model_dir, pattern_data, tmp_path / "run", model={"cpu_dense_copies": False},
                    training={"max_steps": 1})
    out = run_training(config_from_dict(tree), progress=False)
    linears = [m for m in out.model.modules() if isinstance(m, Linear4bit)]
    assert linears and all("_dense_cache" not in m.__dict__ for m in linears)
    assert "model.cpu_dense_copies false" in caplog.text


def test_derived_keys_need_not_be_configured_but_must_agree_when_given():
    import pytest

    from qlorakit.errors import QloraConfigError

    cfg = config_from_dict({"quantization": {"compute_dtype": "float32"},
                            "training": {"batch_size": 4, "gradient_accumulation": 2}})
    assert cfg.training.bf16 is None and cfg.training.effective_batch_size is None  # derived, not required
    with pytest.raises(QloraConfigError, match="training.bf16 is true but quantization.compute_dtype is float32"):
        config_from_dict({"quantization": {"compute_dtype": "float32"}, "training": {"bf16": True}})
    with pytest.raises(QloraConfigError, match="effective_batch_size 6 != batch_size 4 x gradient_accumulation 2"):
        config_from_dict({"training": {"batch_size": 4, "gradient_accumulation": 2, "effective_batch_size": 6}})
