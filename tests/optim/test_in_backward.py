"""HostAdamW (optim/in_backward.py): fp32 master copy and moments in host memory, the step inside backward.

Its claim: with the adapters held in the compute dtype and stepped in backward, training follows exactly the run
that keeps fp32 adapters under autocast and steps qlorakit's AdamW after backward. Autocast casts an fp32 weight
to the compute dtype before every matmul (the same rounding that put the master copy into the parameter), and the
fp32 weight's gradient is the compute-dtype gradient cast up, so losses, gradients and updates are the same
numbers, and these tests compare with torch.equal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlorakit.optim import AdamW, build_optimizer
from qlorakit.optim.errors import OptimizerError
from qlorakit.optim.in_backward import HostAdamW


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 8))


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 24, generator=g), torch.randn(6, 8, generator=g)) for _ in range(n)]


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    with ctx:
        out = net(x)
    return ((out.float() - y) ** 2).mean()


def _train(net, opt, batches, dtype, accumulation, lrs):
    losses = []
    for step, lr in enumerate(lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for i in range(accumulation):
            x, y = batches[step * accumulation + i]
            loss = _loss(net, x, y, dtype) / accumulation
            if hasattr(opt, "begin_micro_batch"):
                opt.begin_micro_batch(i)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("bucket_numel", [1, 1000, 2**22])  # a bucket per tensor, a few, one for all
@pytest.mark.parametrize("staged", [False, True], ids=["in-place", "staged"])  # staged: the CUDA path's slots
def test_same_training_as_fp32_adamw_after_backward(dtype, accumulation, bucket_numel, staged):
    lrs = [3e-3, 2e-3, 1e-3, 5e-4]
    batches = _batches(len(lrs) * accumulation, seed=1)
    ref_net, host_net = _net(0), _net(0)
    ref = AdamW(ref_net.parameters(), lr=1.0, weight_decay=0.01)
    host = HostAdamW(host_net.parameters(), lr=1.0, weight_decay=0.01, compute_dtype=dtype,
                     accumulation=accumulation, bucket_numel=bucket_numel, staged=staged)
    assert bool(host._slots) == staged
    assert all(p.dtype == dtype for p in host_net.parameters())
    assert _train(ref_net, ref, batches, dtype, accumulation, lrs) == \
        _train(host_net, host, batches, dtype, accumulation, lrs)
    for p_ref, p in zip(ref_net.parameters(), host_net.parameters()):
        assert torch.equal(host.master(p), p_ref.detach()), "master copy == the fp32 run's parameter"
        assert torch.equal(p.detach(), p_ref.detach().to(dtype)), "parameter == master rounded to compute dtype"
        assert p.grad is None
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(host.state[p][key].view(-1), ref.state[p_ref][key].view(-1)), key
        assert host.state[p]["step"] == len(lrs)


def test_gradients_leave_as_each_parameter_steps_inside_backward():
    """The hook steps a parameter and drops its gradient during backward: after backward() and before step(),
    no parameter holds a gradient and every one has moved."""
    net = _net(2)
    opt = HostAdamW(net.parameters(), lr=1e-2, compute_dtype=torch.float32)
    before = [p.detach().clone() for p in net.parameters()]
    seen = []
    net[2].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is not None))
    x, y = _batches(1, seed=3)[0]
    _loss(net, x, y, torch.float32).backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, net.parameters()))
    assert all(opt.state[p]["step"] == 1 for p in net.parameters())
    assert seen == [True] or seen == [False]  # our hook and this one both ran once


def test_accumulation_steps_only_on_the_last_micro_batch():
    net = _net(4)
    opt = HostAdamW(net.parameters(), lr=1e-2, compute_dtype=torch.float32, accumulation=2)
    before = [p.detach().clone() for p in net.parameters()]
    (x0, y0), (x1, y1) = _batches(2, seed=5)
    opt.begin_micro_batch(0)
    _loss(net, x0, y0, torch.float32).backward()
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, net.parameters()))
    assert all(p.grad is None for p in net.parameters())  # the sum waits in host memory
    opt.begin_micro_batch(1)
    _loss(net, x1, y1, torch.float32).backward()
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, net.parameters()))
    with pytest.raises(OptimizerError, match="micro-batch 2 of a step of 2"):
        opt.begin_micro_batch(2)


def test_state_dict_round_trip_continues_exactly():
    lrs = [2e-3] * 4
    batches = _batches(4, seed=6)
    a_net, b_net = _net(7), _net(7)
    a = HostAdamW(a_net.parameters(), lr=1.0, compute_dtype=torch.bfloat16)
    b = HostAdamW(b_net.parameters(), lr=1.0, compute_dtype=torch.bfloat16)
    _train(a_net, a, batches[:2], torch.bfloat16, 1, lrs[:2])
    _train(b_net, b, batches[:2], torch.bfloat16, 1, lrs[:2])
    saved = a.state_dict()
    c_net = _net(99)  # other values: everything must come from the state dict
    c = HostAdamW(c_net.parameters(), lr=1.0, compute_dtype=torch.bfloat16)
    c.load_state_dict(saved)
    for p, q in zip(c_net.parameters(), b_net.parameters()):
        assert torch.equal(p.detach(), q.detach())
    assert _train(c_net, c, batches[2:], torch.bfloat16, 1, lrs[2:]) == \
        _train(b_net, b, batches[2:], torch.bfloat16, 1, lrs[2:])
    for p, q in zip(c_net.parameters(), b_net.parameters()):
        assert torch.equal(c.master(p), b.master(q))


def test_a_state_dict_of_another_optimizer_is_refused_in_one_line():
    net = _net(8)
    other = AdamW(_net(8).parameters(), lr=1e-3)
    x, y = _batches(1, seed=9)[0]
    for p in other.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    other.step()
    host = HostAdamW(net.parameters(), lr=1e-3, compute_dtype=torch.float32)
    with pytest.raises(OptimizerError, match="lacks 'master'") as err:
        host.load_state_dict(other.state_dict())
    assert "\n" not in str(err.value)


def test_a_gradient_set_by_hand_is_stepped_by_step():
    p = nn.Parameter(torch.zeros(5))
    opt = HostAdamW([p], lr=0.1, weight_decay=0.0, compute_dtype=torch.float32)
    p.grad = torch.ones(5)
    opt.step()
    assert p.grad is None and opt.state[p]["step"] == 1
    torch.testing.assert_close(p.detach(), torch.full((5,), -0.1), rtol=1e-6, atol=1e-7)


def test_factory_builds_it_and_the_estimator_counts_its_host_bytes():
    from qlorakit.memory.shapes import optimizer_bytes

    net = _net(10)
    opt = build_optimizer("host_adamw_32bit", net.parameters(), lr=1e-3, weight_decay=0.0,
                          compute_dtype=torch.bfloat16, accumulation=2)
    assert isinstance(opt, HostAdamW) and opt.accumulation == 2
    numels = [p.numel() for p in net.parameters()]
    states = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
                 if k in ("master", "exp_avg", "exp_avg_sq"))
    assert states == 12 * sum(numels)  # the views; the flat buffers align each tensor to 64 elements
    aligned = sum(-(-n // 64) * 64 for n in numels)
    assert optimizer_bytes(numels, "host_adamw_32bit").pinned == 12 * aligned
    assert opt.state_bytes_total() == 16 * aligned  # + the fp32 accumulation sum


def test_buckets_follow_backward_order_and_cover_every_tensor_once():
    from qlorakit.optim.buckets import plan_buckets, staging_bytes

    numels = [100, 30, 500, 64, 7, 1000]
    buckets = plan_buckets(numels, bucket_numel=256)
    assert sorted(i for b in buckets for i in b) == list(range(len(numels)))
    assert [i for b in buckets for i in b] == list(reversed(range(len(numels))))  # last tensor first
    # aligned to 64 elements: 1000 -> 1024 alone; 7, 64 -> 64 + 64, then 500 -> 512 overflows 256 but the
    # bucket was not empty, so it closes before it
    assert buckets == [[5], [4, 3], [2], [1, 0]]
    assert staging_bytes(numels, 1, 256) == 2 * 3 * 1024 * 4
    assert staging_bytes(numels, 2, 256) == 2 * 4 * 1024 * 4


def test_staged_slots_prefetch_the_next_bucket_and_survive_a_missing_gradient():
    """The staged path (two slots, prefetch of the next bucket in backward's order, the first bucket prefetched at
    the end of a step) with a parameter that gets no gradient in one step: its bucket steps partially in step(),
    and the run still equals AdamW's, which skips that parameter too."""
    lrs = [2e-3] * 4
    batches = _batches(4, seed=11)
    ref_net, host_net = _net(12), _net(12)
    ref = AdamW(ref_net.parameters(), lr=1.0)
    host = HostAdamW(host_net.parameters(), lr=1.0, compute_dtype=torch.float32, bucket_numel=700, staged=True)
    assert len(host._buckets) > 2
    for step, lr in enumerate(lrs):
        for opt in (ref, host):
            for g in opt.param_groups:
                g["lr"] = lr
        frozen = step == 1  # the first layer's bias gets no gradient in step 2
        for net, opt in ((ref_net, ref), (host_net, host)):
            net[0].bias.requires_grad_(not frozen)
            x, y = batches[step]
            _loss(net, x, y, torch.float32).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            net[0].bias.requires_grad_(True)
        assert host._slots[0].owner == (0, True)  # the next step's first bucket is already staged
    for p_ref, p in zip(ref_net.parameters(), host_net.parameters()):
        assert torch.equal(host.master(p), p_ref.detach())
    assert host.state[host_net[0].bias]["step"] == len(lrs) - 1


@pytest.mark.parametrize("staged", [False, True], ids=["in-place", "staged"])
def test_accumulation_with_tensors_missing_a_gradient_in_some_micro_batches(staged):
    """With accumulation, a tensor's sum counts only the micro-batches that gave it a gradient, and a tensor whose
    gradient came in an earlier micro-batch but not the last one still steps in step(): as .grad accumulates."""
    batches = _batches(6, seed=13)
    ref_net, host_net = _net(14), _net(14)
    ref = AdamW(ref_net.parameters(), lr=2e-3)
    host = HostAdamW(host_net.parameters(), lr=2e-3, compute_dtype=torch.float32, accumulation=2, bucket_numel=700,
                     staged=staged)
    for step in range(3):
        for net, opt in ((ref_net, ref), (host_net, host)):
            for i in range(2):
                frozen = net[4].bias if i == 0 else net[0].bias  # no gradient for one tensor in each micro-batch
                frozen.requires_grad_(False)
                if hasattr(opt, "begin_micro_batch"):
                    opt.begin_micro_batch(i)
                x, y = batches[2 * step + i]
                (_loss(net, x, y, torch.float32) / 2).backward()
                frozen.requires_grad_(True)
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p_ref, p in zip(ref_net.parameters(), host_net.parameters()):
        assert torch.equal(host.master(p), p_ref.detach())
        assert host.state[p]["step"] == ref.state[p_ref]["step"] == 3
