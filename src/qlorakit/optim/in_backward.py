"""AdamW whose fp32 master weights and moments live in pinned host memory and whose step runs inside backward.

    opt = HostAdamW(params, lr=2e-4, weight_decay=0.0, compute_dtype=torch.bfloat16, accumulation=1)

What it is for: a 70B model on a 48 GB card. There the 828 M LoRA parameters of r=64 on all linears cost 3.1 GiB
in fp32, their fp32 gradients 3.1 GiB more and AdamW's two moments 6.2 GiB, beside ~34 GiB of 4-bit weights.
Here the GPU keeps only the adapters in the compute dtype (what autocast would have cast the fp32 adapters to
before every matmul, so the forward and the gradients are the same numbers), and, per trainable tensor, pinned
host memory keeps the fp32 master copy, both moments and (with gradient accumulation) an fp32 gradient sum.

The step: a hook on each parameter (Tensor.register_post_accumulate_grad_hook) fires in backward as soon as the
parameter's gradient is complete. On a side CUDA stream, ordered after the gradient, it copies the master copy and
moments to the GPU, applies the update (reference.adamw_update_32bit: torch.optim.AdamW's math in fp32, the same
as qlorakit's AdamW), rounds the master copy into the GPU parameter and copies master and moments back; the
gradient is then dropped. So at most the gradients of the layers whose step is in flight exist at once, and the
copies overlap the backward of the layers below. `step()` (called where the training loop calls every optimizer's
step) waits for the side stream; the next forward reads the updated parameters.

Micro-batches: with `accumulation` > 1 the hook adds each micro-batch's gradient into the fp32 host sum (through
the GPU, on the side stream) and steps on the last one; `begin_micro_batch(i)` says which one is next.

Not possible here, and refused by the training config: gradient clipping by the global norm (each tensor steps
before the norm of all gradients exists), data parallelism (gradients would have to be reduced first). On a
machine without CUDA the same hooks run the same update synchronously (the states still live in host memory),
so the CPU tests check the bookkeeping and the arithmetic.

state_dict(): the torch layout; per parameter "step" (int) and "master", "exp_avg", "exp_avg_sq" (fp32 CPU
tensors, copies). `master(p)`: parameter p's fp32 master copy, for saving the adapter at
full precision.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from .errors import OptimizerError
from .reference import StepConstants, adamw_update_32bit

log = logging.getLogger("qlorakit.optim")

_STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


class HostAdamW(torch.optim.Optimizer):
    """AdamW, fp32 master + moments in (pinned) host memory, stepping inside backward; see the module docstring."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 compute_dtype: torch.dtype = torch.bfloat16, accumulation: int = 1):
        if not lr >= 0.0:
            raise OptimizerError(f"lr {lr!r} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise OptimizerError(f"betas {betas!r} must be in [0, 1)")
        if accumulation < 1:
            raise OptimizerError(f"accumulation {accumulation!r} must be >= 1")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.accumulation = accumulation
        self._micro = 0
        self._stepped = 0  # parameters stepped since the last step(): a step is half applied while > 0
        self._hooks = []
        self._stream = None
        for group in self.param_groups:
            for p in group["params"]:
                if not p.dtype.is_floating_point:
                    raise OptimizerError(f"HostAdamW updates floating-point tensors, not {p.dtype}")
                self._adopt(p, compute_dtype)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(group)))
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)

    # -- set-up -------------------------------------------------------------------------------------------------

    def _adopt(self, p: torch.Tensor, compute_dtype: torch.dtype) -> None:
        """Master copy and zeroed moments in host memory (pinned where CUDA is), then p in the compute dtype."""
        pin = p.device.type == "cuda"

        def host(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty(t.shape, dtype=torch.float32, pin_memory=pin)
            out.copy_(t.detach())
            return out

        master = host(p)
        self.state[p] = {"step": 0, "master": master, "exp_avg": torch.zeros_like(master),
                         "exp_avg_sq": torch.zeros_like(master)}
        if self.accumulation > 1:
            self.state[p]["grad_sum"] = torch.zeros_like(master)
        with torch.no_grad():
            p.data = p.data.to(compute_dtype)

    def _make_hook(self, group: dict[str, Any]):
        def hook(p: torch.Tensor) -> None:
            self._on_grad(p, group)

        return hook

    # -- the step inside backward ----------------------------------------------------------------------------

    def begin_micro_batch(self, index: int) -> None:
        """Say that micro-batch `index` (0-based, of `accumulation`) of this step comes next."""
        if not 0 <= index < self.accumulation:
            raise OptimizerError(f"micro-batch {index} of a step of {self.accumulation}")
        self._micro = index

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise OptimizerError("HostAdamW does not support sparse gradients")
        stream = self._stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(p.device))
            with torch.cuda.stream(stream):
                self._update(p, grad, group)
            grad.record_stream(stream)
        else:
            self._update(p, grad, group)
        p.grad = None

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        st = self.state[p]
        dev = p.device
        g32 = grad.to(torch.float32)
        last = self._micro == self.accumulation - 1
        if self.accumulation > 1:
            if self._micro > 0:
                g32 = g32 + st["grad_sum"].to(dev, non_blocking=True)
            if not last:
                st["grad_sum"].copy_(g32, non_blocking=True)
                return
        st["step"] += 1
        self._stepped += 1
        c = StepConstants.for_step(group["lr"], group["betas"], group["eps"], group["weight_decay"], st["step"])
        master = st["master"].to(dev, non_blocking=True)
        m = st["exp_avg"].to(dev, non_blocking=True).view(-1)
        v = st["exp_avg_sq"].to(dev, non_blocking=True).view(-1)
        adamw_update_32bit(master, g32, m, v, c)
        p.copy_(master)
        st["master"].copy_(master, non_blocking=True)
        st["exp_avg"].view(-1).copy_(m, non_blocking=True)
        st["exp_avg_sq"].view(-1).copy_(v, non_blocking=True)

    def _synchronize(self) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
            self._stream.synchronize()

    @torch.no_grad()
    def step(self, closure=None) -> float | None:
        """The updates ran in backward: wait for them, so the next forward reads the new parameters. A parameter
        whose gradient is still here (its hook did not run, e.g. a gradient set by hand) is stepped now."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._on_grad(p, group)
        self._synchronize()
        self._micro = 0
        self._stepped = 0
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
        n = sum(t.numel() * t.element_size() for st in self.state.values() for k, t in st.items() if k != "step")
        return {"pinned" if self._stream is not None else "host": n}

    def describe(self) -> str:
        n = sum(p.numel() for g in self.param_groups for p in g["params"])
        where = "pinned host memory" if self._stream is not None else "host memory"
        return (f"AdamW 32-bit in {where} (fp32 master copy + 2 moments, {self.state_bytes_total() / 2**30:.2f} GiB "
                f"for {n:,} parameters), each adapter stepping inside backward")

    def state_bytes_total(self) -> int:
        return sum(self.state_bytes().values())

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

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
