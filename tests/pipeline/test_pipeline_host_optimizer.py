"""training.optimizer host_adamw_32bit through the whole pipeline: bf16 compute, LoRA dropout, gradient
accumulation. The run must equal the one that keeps fp32 adapters and steps adamw_32bit after backward (same
per-step losses, same saved fp32 adapter: see tests/optim/test_in_backward.py for why they are the same numbers),
resume exactly from its checkpoints, and a Ctrl-C inside backward, while some adapters have stepped and others
not, must not be saved as a step."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import run_tree, train_losses
from safetensors.torch import load_file

from qlorakit.config import config_from_dict
from qlorakit.errors import QloraConfigError
from qlorakit.optim.in_backward import HostAdamW
from qlorakit.train.checkpoint import latest_checkpoint
from qlorakit.train.run import run_training

STEPS = 4


def _config(model_dir, data, out, optimizer):
    tree = run_tree(model_dir, data, out, lora={"dropout": 0.1},
                    quantization={"compute_dtype": "bfloat16"},
                    training={"max_steps": STEPS, "batch_size": 2, "gradient_accumulation": 2, "bf16": True,
                              "learning_rate": 5e-3, "optimizer": optimizer, "max_grad_norm": None,
                              "save_every": 2})
    return config_from_dict(tree)


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def fp32_adamw_run(tiny_model_dir, pattern_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("adamw") / "run"
    run_training(_config(tiny_model_dir, pattern_data, out, "adamw_32bit"), progress=False)
    return out


def test_same_run_as_fp32_adapters_with_adamw_after_backward(tiny_model_dir, pattern_data, tmp_path,
                                                             fp32_adamw_run):
    out = tmp_path / "run"
    result = run_training(_config(tiny_model_dir, pattern_data, out, "host_adamw_32bit"), progress=False)
    adapters = [p for p in result.model.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.bfloat16 for p in adapters)  # on the device: compute dtype
    assert train_losses(out) == train_losses(fp32_adamw_run)
    ours, ref = _adapter(out), _adapter(fp32_adamw_run)
    assert ours.keys() == ref.keys()
    for key, tensor in ours.items():
        assert tensor.dtype == torch.float32, key  # saved from the master copy
        assert torch.equal(tensor, ref[key]), key


def test_resumes_exactly_and_a_ctrl_c_inside_backward_keeps_the_last_whole_step(
        tiny_model_dir, pattern_data, tmp_path, fp32_adamw_run, monkeypatch):
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, pattern_data, out, "host_adamw_32bit")
    from qlorakit.optim import in_backward

    real_run, real_plan = HostAdamW._run, in_backward.plan_buckets

    def run(self, bucket):
        # Stop in step 3's last micro-batch, after three buckets (one tensor each, below) have stepped.
        if self.state[bucket.params[0]]["step"] == 2 and self._micro == 1 and self._stepped == 3:
            raise KeyboardInterrupt
        return real_run(self, bucket)

    with monkeypatch.context() as patch:
        patch.setattr(HostAdamW, "_run", run)
        patch.setattr(in_backward, "plan_buckets", lambda numels, bucket_numel=0: real_plan(numels, 1))
        first = run_training(cfg, progress=False)
    assert first.result.interrupted and first.result.steps == 2
    assert latest_checkpoint(out).name == "step-000002" == first.result.checkpoint.name
    second = run_training(cfg, progress=False)
    assert second.result.resumed_from == 2 and second.result.steps == STEPS
    assert train_losses(out) == train_losses(fp32_adamw_run)
    ref = _adapter(fp32_adamw_run)
    for key, tensor in _adapter(out).items():
        assert torch.equal(tensor, ref[key]), key


def test_clipping_is_refused_in_one_line(tiny_model_dir, pattern_data, tmp_path):
    tree = run_tree(tiny_model_dir, pattern_data, tmp_path / "run", training={"optimizer": "host_adamw_32bit",
                                                                              "max_grad_norm": 0.3})
    with pytest.raises(QloraConfigError, match="max_grad_norm: null") as err:
        config_from_dict(tree)
    assert "\n" not in str(err.value).strip()


def test_lean_settings_on_a_cpu_run_say_what_they_do_and_leave_nothing_behind(tiny_model_dir, pattern_data,
                                                                                tmp_path, caplog, monkeypatch):
    """embeddings_on_host needs CUDA (said, not silently ignored); stacked_dequant false caps the process-wide
    dequantize workspace during the run only."""
    import qlorakit.train.loop as loop_module
    from qlorakit.kernels import workspace_limit

    tree = run_tree(tiny_model_dir, pattern_data, tmp_path / "run",
                    training={"max_steps": 1, "embeddings_on_host": True, "head_on_host": True,
                              "stacked_dequant": False})
    seen = {}
    forward = loop_module.forward_loss_sum

    def spy(*args, **kwargs):  # the cap while the run trains
        seen["cap"] = workspace_limit()
        return forward(*args, **kwargs)

    caplog.set_level("INFO", logger="qlorakit")
    monkeypatch.setattr(loop_module, "forward_loss_sum", spy)
    run_training(config_from_dict(tree), progress=False)
    assert seen["cap"] == 0 and workspace_limit() is None
    assert "embeddings_on_host / head_on_host need a CUDA device" in caplog.text
    assert "stacked_dequant false" in caplog.text
