"""32-bit AdamW against torch.optim.AdamW: the same parameters after every step, to fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from qlorakit.optim import AdamW

# (shape) -- below and above the 4096-element threshold, odd sizes, a scalar-like vector.
SHAPES = [(7,), (64, 63), (4096,), (3, 5000), (129, 33)]


def _pair(seed: int, **kw):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    return ours, theirs, AdamW(ours, **kw), torch.optim.AdamW(theirs, **kw), g


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_adamw_step_for_step(weight_decay):
    ours, theirs, opt, ref, g = _pair(0, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    for _ in range(25):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, generator=g) * 10 ** float(torch.empty(1).uniform_(-4, 1, generator=g))
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            # Same update; only the rounding of the fused ops (lerp, addcmul, addcdiv, sqrt) differs.
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
        for a, b in zip(ours, theirs):
            for key in ("exp_avg", "exp_avg_sq"):
                # Moments are sums with cancellation: compare to the tensor's scale, not element by element.
                mine, torchs = opt.state[a][key].view(a.shape), ref.state[b][key]
                assert (mine - torchs).abs().max() <= 1e-6 * torchs.abs().max()


def test_parameters_without_gradient_are_skipped_and_lr_changes_apply():
    ours, theirs, opt, ref, g = _pair(1, lr=1e-2, weight_decay=0.01)
    for step in range(6):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            grad = None if (i + step) % 3 == 0 else torch.randn(a.shape, generator=g)
            a.grad = None if grad is None else grad.clone()
            b.grad = None if grad is None else grad.clone()
        for group in (*opt.param_groups, *ref.param_groups):
            group["lr"] = 1e-2 / (step + 1)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
        assert opt.state[a]["step"] == int(ref.state[b]["step"])


def test_closure_is_called_with_grad_enabled():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == 3.0 and p.detach().lt(1).all()


def test_bf16_parameters_are_updated_in_fp32_with_fp32_states():
    p32 = torch.randn(64, 80)
    pb = p32.to(torch.bfloat16).requires_grad_()
    opt = AdamW([pb], lr=1e-3)
    pb.grad = torch.randn(64, 80).to(torch.bfloat16)
    opt.step()
    assert opt.state[pb]["exp_avg"].dtype == torch.float32 and pb.dtype == torch.bfloat16


def test_bad_arguments_are_refused():
    from qlorakit.optim import OptimizerError

    p = [torch.nn.Parameter(torch.ones(2))]
    for kw in ({"lr": -1.0}, {"betas": (1.0, 0.9)}, {"state_bits": 4}, {"paged": "disk"}, {"block_size": 100}):
        with pytest.raises(OptimizerError):
            AdamW(p, **kw)
