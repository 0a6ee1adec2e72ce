"""AdamW whose fp32 master weights and moments live in pinned host memory and whose step runs inside backward.

    opt = HostAdamW(params, lr=2e-4, weight_decay=0.0, compute_dtype=torch.bfloat16, accumulation=1)

What it is for: a 70B model on a 48 GB card. There the 828 M LoRA parameters of r=64 on all linears cost 3.1 GiB
in fp32, their fp32 gradients 3.1 GiB more and AdamW's two moments 6.2 GiB, beside ~34 GiB of 4-bit weights.
Here the GPU keeps only the adapters in the compute dtype (what autocast would have cast the fp32 adapters to
before every matmul, so the forward and the gradients are the same numbers), and, per trainable tensor, pinned
host memory keeps the fp32 master copy, both moments and (with gradient accumulation) an fp32 gradient sum.

The step: the tensors are grouped into buckets of about `bucket_numel` elements, in the order backward finishes
them (last layers first; plan_buckets), each bucket one contiguous range of flat pinned buffers. A hook on each
parameter (Tensor.register_post_accumulate_grad_hook) takes its gradient as soon as it is complete; when a
bucket's gradients are all there, on CUDA:
  - host-to-device stream: the bucket's master copy and moments into one of two GPU staging slots (three copies;
    usually already done: each bucket's states are fetched while the bucket before it is updated, and the first
    bucket's while the next forward runs);
  - update stream, after the gradients and the copies: qlorakit's fused AdamW kernel (the one AdamW uses, so the
    same fp32 arithmetic; the PyTorch reference where Triton is not used), then each parameter <- its master copy
    rounded to the compute dtype; the gradients are released to the allocator once this stream is past them;
  - device-to-host stream: master copy and moments back to the host.
So only the gradients of the buckets in flight exist at once, the copies run beside the backward of the layers
below, and the streams' order makes `step()` (where the training loop calls every optimizer's step) only order
the next forward after the updates, without waiting on the host. On a machine without CUDA the same buckets are
updated in place in host memory, synchronously, so the CPU tests check the bookkeeping and the arithmetic.

Micro-batches: with `accumulation` > 1 the buckets add each micro-batch's gradient into an fp32 sum (host, through
the slots) and step on the last one; `begin_micro_batch(i)` says which one is next.

Not possible here, and refused by the training config: gradient clipping by the global norm (each tensor steps
before the norm of all gradients exists), data parallelism (gradients would have to be reduced first).

state_dict(): the torch layout; per parameter "step" (int) and "master", "exp_avg", "exp_avg_sq" (fp32 CPU
tensors, copies). `master(p)`: parameter p's fp32 master copy, for saving the adapter at
full precision.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import torch

from .adamw import _backend
from .buckets import BUCKET_NUMEL, _align, _Bucket, _Slot, plan_buckets

_BLOCK = 256  # the fused AdamW kernel's block for fp32 moments
from .errors import OptimizerError
from .reference import StepConstants, UpdateItem, adamw_update_32bit

log = logging.getLogger("qlorakit.optim")

_STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


class _Inline:
    """Stand-in for a CUDA stream or event where there is none: work runs in order, so every wait is a no-op.
    It lets the staged path (slots, streams, prefetch) run on a CPU, where tests check its bookkeeping."""

    def wait_stream(self, other: object) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass

    def record(self, stream: object = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostAdamW(torch.optim.Optimizer):
    """AdamW, fp32 master + moments in (pinned) host memory, stepping inside backward; see the module docstring."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 compute_dtype: torch.dtype = torch.bfloat16, accumulation: int = 1,
                 bucket_numel: int = BUCKET_NUMEL, staged: bool | None = None):
        if not lr >= 0.0:
            raise OptimizerError(f"lr {lr!r} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise OptimizerError(f"betas {betas!r} must be in [0, 1)")
        if accumulation < 1:
            raise OptimizerError(f"accumulation {accumulation!r} must be >= 1")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.accumulation = accumulation
        self._micro = 0
        self._stepped = 0  # tensors stepped since the last step(): a step is half applied while > 0
        self._summed: set[int] = set()  # ids of tensors whose gradient sum holds this step's earlier micro-batches
        self._kernel_cache: dict = {}
        params = [p for g in self.param_groups for p in g["params"]]
        if not params:
            raise OptimizerError("HostAdamW got no parameters")
        for p in params:
            if not p.dtype.is_floating_point:
                raise OptimizerError(f"HostAdamW updates floating-point tensors, not {p.dtype}")
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        self.device = params[0].device
        self._cuda = self.device.type == "cuda"
        # staged: states go through the two GPU slots on three streams (always on CUDA; on a CPU only when asked,
        # with in-order stand-ins for the streams, so that the tests exercise the same bookkeeping)
        self._staged = self._cuda if staged is None else (staged or self._cuda)
        self._keys = _STATE_KEYS + (("grad_sum",) if accumulation > 1 else ())
        plan = plan_buckets([p.numel() for p in params], bucket_numel)
        total = sum(_align(params[i].numel()) for b in plan for i in b)
        self._host = {k: torch.zeros(total, dtype=torch.float32, pin_memory=self._cuda) for k in self._keys}
        self._buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        start = 0
        for index, members in enumerate(plan):
            chosen = [params[i] for i in members]
            offsets, at = [], 0
            for p in chosen:
                offsets.append(at)
                at += _align(p.numel())
            bucket = _Bucket(index, chosen, offsets, start, at)
            self._buckets.append(bucket)
            for p, off in zip(chosen, offsets):
                self._bucket_of[id(p)] = bucket
                self._adopt(p, start + off, compute_dtype)
            start += at
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]
        self._slots: list[_Slot] = []
        if self._staged:
            span = max(b.span for b in self._buckets)
            self._slots = [_Slot(torch.empty((len(self._keys), span), dtype=torch.float32, device=self.device))
                           for _ in range(2)]
            self._h2d, self._comp, self._d2h = (torch.cuda.Stream(self.device) if self._cuda else _Inline()
                                                for _ in range(3))

    # -- set-up -------------------------------------------------------------------------------------------------

    def _adopt(self, p: torch.Tensor, at: int, compute_dtype: torch.dtype) -> None:
        """State views into the flat host buffers (master = p's values), then p in the compute dtype."""
        n = p.numel()
        views = {k: self._host[k][at:at + n].view(p.shape) for k in self._keys}
        views["master"].copy_(p.detach())
        self.state[p] = {"step": 0, "step_taken": False, **views}
        with torch.no_grad():
            p.data = p.data.to(compute_dtype)

    # -- the step inside backward ----------------------------------------------------------------------------

    def begin_micro_batch(self, index: int) -> None:
        """Say that micro-batch `index` (0-based, of `accumulation`) of this step comes next."""
        if not 0 <= index < self.accumulation:
            raise OptimizerError(f"micro-batch {index} of a step of {self.accumulation}")
        for b in self._buckets:  # buckets left incomplete by the micro-batch before (a tensor got no gradient)
            if b.ready:
                self._run(b)
        self._micro = index
        if self._staged:  # the gradient sum the last micro-batch wrote back is read again
            self._h2d.wait_stream(self._d2h)

    def _on_grad(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise OptimizerError("HostAdamW does not support sparse gradients")
        bucket = self._bucket_of[id(p)]
        bucket.ready[id(p)] = grad
        p.grad = None
        if len(bucket.ready) == len(bucket.params):
            self._run(bucket)

    @torch.no_grad()
    def _run(self, b: _Bucket) -> None:
        """Update (or, before the last micro-batch, accumulate) the ready tensors of bucket b."""
        last = self._micro == self.accumulation - 1
        if not self._staged:
            self._compute(b, {k: self._host[k][b.start:b.start + b.span] for k in self._keys}, last)
            b.ready.clear()
            return
        slot = self._stage(b, last)
        self._comp.wait_stream(self._current())  # the gradients are complete
        self._comp.wait_event(slot.loaded)
        with self._on(self._comp):
            rows = {k: slot.buf[i, :b.span] for i, k in enumerate(self._keys)}
            self._compute(b, rows, last)
            done = self._event()
            done.record(self._comp)
        self._d2h.wait_event(done)
        with self._on(self._d2h):
            for i, k in enumerate(self._keys):
                if (k == "grad_sum") != last:  # after the step the sum is spent; before it, only the sum changed
                    self._host[k][b.start:b.start + b.span].copy_(slot.buf[i, :b.span], non_blocking=True)
            slot.free = self._event()
            slot.free.record(self._d2h)
        if self._cuda:
            for g in b.ready.values():
                g.record_stream(self._comp)  # the allocator keeps each gradient until the update has read it
        b.ready.clear()
        slot.owner = None
        if last and b.index + 1 < len(self._buckets):  # the next bucket backward finishes: its states now
            self._stage(self._buckets[b.index + 1], True)

    def _stage(self, b: _Bucket, states: bool) -> _Slot:
        """The slot of bucket b, holding its states (and sum) when `states`, else its gradient sum, copied in on
        the host-to-device stream after the slot's last copies out; nothing is copied when already there."""
        slot = self._slots[b.index % 2]
        if slot.owner == (b.index, states):
            return slot
        if slot.free is not None:
            self._h2d.wait_event(slot.free)
        with self._on(self._h2d):
            for i, k in enumerate(self._keys):
                wanted = states if k != "grad_sum" else self._micro > 0
                if wanted:
                    slot.buf[i, :b.span].copy_(self._host[k][b.start:b.start + b.span], non_blocking=True)
            slot.loaded = self._event()
            slot.loaded.record(self._h2d)
        slot.owner = (b.index, states)
        return slot

    def _compute(self, b: _Bucket, rows: dict[str, torch.Tensor], last: bool) -> None:
        items = []
        constants: dict[tuple[int, int], StepConstants] = {}
        for p, off in zip(b.params, b.offsets):
            grad = b.ready.get(id(p))
            if grad is None:
                continue
            n = p.numel()
            g = grad.reshape(-1)
            if self.accumulation > 1:
                # a tensor's first gradient of this step starts its sum (whichever micro-batch brings it), so a
                # tensor without a gradient in some micro-batches sums only those it had, as .grad would
                total = rows["grad_sum"][off:off + n]
                total.add_(g) if id(p) in self._summed else total.copy_(g)
                self._summed.add(id(p))
                if not last:
                    continue
                g = total
            st = self.state[p]
            st["step"] += 1
            st["step_taken"] = True
            self._stepped += 1
            group = self._group_of[id(p)]
            key = (id(group), st["step"])
            if key not in constants:
                constants[key] = StepConstants.for_step(group["lr"], group["betas"], group["eps"],
                                                        group["weight_decay"], st["step"])
            items.append((p, rows["master"][off:off + n], g.contiguous(), rows["exp_avg"][off:off + n],
                          rows["exp_avg_sq"][off:off + n], constants[key]))
        if not items:
            return
        if self._cuda and _backend(self.device) == "triton":
            from .triton_update import launch_updates

            launch_updates([UpdateItem(m, g, (ea, eas), c, False, _BLOCK) for _, m, g, ea, eas, c in items],
                           self._kernel_cache)
        else:
            for _, m, g, ea, eas, c in items:
                adamw_update_32bit(m, g, ea, eas, c)
        for p, m, *_ in items:
            p.copy_(m.view(p.shape))

    def _current(self):
        return torch.cuda.current_stream(self.device) if self._cuda else _Inline()

    def _on(self, stream):
        return torch.cuda.stream(stream) if self._cuda else contextlib.nullcontext()

    def _event(self):
        return torch.cuda.Event() if self._cuda else _Inline()

    def _synchronize(self) -> None:
        if self._staged:
            self._comp.synchronize()
            self._d2h.synchronize()

    @torch.no_grad()
    def step(self, closure=None) -> float | None:
        """The updates ran in backward: order the next forward after them. A tensor whose gradient is still here
        (its hook did not run, e.g. a gradient set by hand) and buckets some of whose tensors got no gradient are
        stepped now."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._on_grad(p)
        if self._summed:  # gradients summed in earlier micro-batches of tensors that got none in the last one
            self._micro = self.accumulation - 1
            for group in self.param_groups:
                for p in group["params"]:
                    if id(p) in self._summed and self.state[p]["step_taken"] is False:
                        self._bucket_of[id(p)].ready.setdefault(id(p), torch.zeros_like(p))
        for b in self._buckets:
            if b.ready:
                self._run(b)
        if self._staged:
            self._current().wait_stream(self._comp)  # the next forward reads the updates
            self._h2d.wait_stream(self._d2h)  # the next step reads what this one wrote back
            if self.accumulation == 1:
                self._stage(self._buckets[0], True)  # overlaps the next forward
        self._micro = 0
        self._stepped = 0
        self._summed.clear()
        for st in self.state.values():
            st["step_taken"] = False
        return loss

    @property
    def step_in_progress(self) -> bool:
        """Whether some parameters took this step's update and others not yet (an exception inside backward):
        then neither the parameters nor this state is a whole step, and must not be saved as one."""
        return self._stepped > 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    # -- what the run saves --------------------------------------------------------------------------------------

    def state_bytes(self) -> dict[str, int]:
        return {"pinned" if self._cuda else "host": sum(t.numel() * t.element_size() for t in self._host.values())}

    def state_bytes_total(self) -> int:
        return sum(self.state_bytes().values())

    def staging_bytes(self) -> int:
        return sum(s.buf.numel() * s.buf.element_size() for s in self._slots)

    def describe(self) -> str:
        n = sum(p.numel() for g in self.param_groups for p in g["params"])
        where = "pinned host memory" if self._cuda else "host memory"
        return (f"AdamW 32-bit in {where} (fp32 master copy + 2 moments, {self.state_bytes_total() / 2**30:.2f} GiB "
                f"for {n:,} parameters), {len(self._buckets)} buckets stepping inside backward")

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master copy of parameter `p` (a CPU copy), e.g. for saving the adapter at full precision."""
        if p not in self.state:
            raise OptimizerError("this parameter is not one HostAdamW updates")
        self._synchronize()
        return self.state[p]["master"].clone()

    def state_dict(self) -> dict[str, Any]:
        if self.step_in_progress:
            raise OptimizerError("HostAdamW: a step is half applied (backward stopped while the adapters were "
                                 "stepping); its state is not a step's and is not saved")
        self._synchronize()
        params = [p for g in self.param_groups for p in g["params"]]
        state = {i: {"step": self.state[p]["step"], **{k: self.state[p][k].clone() for k in _STATE_KEYS}}
                 for i, p in enumerate(params)}
        index = {id(p): i for i, p in enumerate(params)}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [index[id(p)] for p in g["params"]]} for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._synchronize()
        params = [p for g in self.param_groups for p in g["params"]]
        saved = state_dict.get("state", {})
        if len(state_dict.get("param_groups", [])) != len(self.param_groups):
            raise OptimizerError(f"optimizer state has {len(state_dict.get('param_groups', []))} parameter groups; "
                                 f"this optimizer has {len(self.param_groups)}")
        for i, p in enumerate(params):
            entry = saved.get(i, saved.get(str(i)))
            if entry is None:
                raise OptimizerError(f"optimizer state has no entry for parameter {i}")
            st = self.state[p]
            for k in _STATE_KEYS:
                if k not in entry:
                    raise OptimizerError(f"optimizer state of parameter {i} lacks {k!r} (saved by another optimizer?)")
                if tuple(entry[k].shape) != tuple(st[k].shape):
                    raise OptimizerError(f"optimizer state {k!r} of parameter {i} has shape {tuple(entry[k].shape)}; "
                                         f"the parameter has {tuple(st[k].shape)}")
                st[k].copy_(entry[k])
            st["step"] = int(entry["step"])
            p.copy_(st["master"])
        for group, g in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in g.items() if k != "params"})
        for slot in self._slots:  # what was staged came from the old state
            slot.owner = None

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
