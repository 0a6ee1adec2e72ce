"""Optimizer state through the training checkpoint format (safetensors + JSON): resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlorakit.optim import AdamW, OptimizerError
from qlorakit.train.checkpoint import _optimizer_from_files, _optimizer_to_files

SHAPES = [(48, 100), (300,), (5000,), (16, 1024)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * 0.1 for s in SHAPES]


def _train(opt: AdamW, params, steps: range) -> None:
    for step in steps:
        for p, grad in zip(params, _grads(step)):
            p.grad = grad
        if step == steps.start + 1:
            params[1].grad = None  # a step without a gradient for one parameter
        opt.step()


def _through_files(opt: AdamW, tmp_path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = _optimizer_to_files(opt)
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "optimizer.json").write_text(json.dumps(meta))
    return load_file(str(tmp_path / "optimizer.safetensors")), json.loads((tmp_path / "optimizer.json").read_text())


@pytest.mark.parametrize("state_bits", [8, 32])
def test_resume_from_saved_state_gives_identical_next_steps(tmp_path, state_bits):
    params = _params()
    opt = AdamW(params, lr=1e-2, weight_decay=0.05, state_bits=state_bits)
    _train(opt, params, range(0, 7))
    tensors, meta = _through_files(opt, tmp_path)

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = AdamW(resumed_params, lr=123.0, weight_decay=0.0, state_bits=state_bits)  # groups come from the file
    _optimizer_from_files(resumed, tensors, meta)
    assert resumed.param_groups[0]["lr"] == 1e-2 and resumed.param_groups[0]["betas"] == (0.9, 0.999)

    _train(opt, params, range(7, 12))
    _train(resumed, resumed_params, range(7, 12))
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed_params):
        assert opt.state[a]["step"] == resumed.state[b]["step"]
        for key, value in opt.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, resumed.state[b][key]), key


def test_8bit_state_is_saved_as_codes_and_absmax_in_safetensors(tmp_path):
    params = _params()
    opt = AdamW(params, lr=1e-2, state_bits=8)
    _train(opt, params, range(0, 2))
    tensors, meta = _through_files(opt, tmp_path)
    assert tensors["state.2.exp_avg_codes"].dtype == torch.uint8 and tensors["state.2.exp_avg_codes"].numel() == 5000
    absmax = tensors["state.2.exp_avg_sq_absmax"]
    assert absmax.dtype == torch.float32 and absmax.numel() == 20
    assert tensors["state.1.exp_avg"].dtype == torch.float32  # 300 elements: fp32
    assert meta["scalars"]["2"] == {"step": 2} and meta["param_groups"][0]["state_bits"] == 8


def test_state_dict_holds_independent_copies():
    params = _params()
    opt = AdamW(params, lr=1e-2, state_bits=8)
    _train(opt, params, range(0, 2))
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_codes"].zero_()
    assert not torch.equal(opt.state[params[0]]["exp_avg_codes"], sd["state"][0]["exp_avg_codes"])


def test_loading_a_state_of_another_kind_is_refused(tmp_path):
    params = _params()
    opt8 = AdamW(params, lr=1e-2, state_bits=8)
    _train(opt8, params, range(0, 2))
    tensors, meta = _through_files(opt8, tmp_path)
    opt32 = AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_bits=32)
    with pytest.raises(OptimizerError, match="state_bits=8"):
        _optimizer_from_files(opt32, tensors, meta)
    with pytest.raises(OptimizerError, match="other parameters"):
        AdamW(params[:2], lr=1e-2, state_bits=8).load_state_dict(opt8.state_dict())
