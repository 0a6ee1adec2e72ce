"""Data-parallel training across the processes `torchrun` starts (training.distributed: auto | ddp | fsdp).

Every rank loads and quantizes the whole base model and holds the same LoRA adapters; the 4-bit buffers are
frozen and never communicated. One optimizer step's micro-batches (gradient_accumulation of them, batch_size rows
each, exactly the single-process plan) are dealt out: rank r forwards micro-batches r, r + world_size, ... Every
rank collates all of them, so each knows the step's total target count without a collective and divides its
summed token losses by that global count; after the backward passes the LoRA gradients and the loss sums are
all-reduced (summed). Every rank then holds the single-process gradient, clips and steps identically, and the
adapters stay equal without a broadcast.

This is hand-rolled rather than torch's DistributedDataParallel: DDP would broadcast the packed uint8 buffers
every forward unless told not to, gradient accumulation would need its no_sync(), and overlapping the all-reduce
with backward gains little for a few megabytes of LoRA gradients. The result differs from a single process only
by the order of the gradient sums (with two ranks and two micro-batches, not at all), as long as LoRA dropout is
0: ranks above 0 draw their dropout masks from their own seed, and checkpoints keep every rank's RNG states, so
resuming a run with dropout is still exact for the same world size.

training.distributed: fsdp shards the model instead of replicating it (fsdp.py): the micro-batches are dealt out
the same way, and FSDP2's reduce-scatter replaces the all-reduce.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import QloraConfigError

log = logging.getLogger("qlorakit.train")

T = TypeVar("T")

# NVLink multicast (NVLS / symmetric-memory multicast) is off by default: on shared or partitioned GPUs it can
# hang or fail at NCCL init, and the LoRA all-reduces are far too small to gain from it.
_COMM_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class TorchrunEnv:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> TorchrunEnv | None:
    """The torchrun environment of this process, or None when it was not started by torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return TorchrunEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                           int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    except ValueError:
        raise QloraConfigError(f"RANK={os.environ['RANK']!r}, WORLD_SIZE={os.environ['WORLD_SIZE']!r}: "
                               "not integers; start distributed runs with torchrun") from None


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run; the default is a single process (no collectives)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when init_distributed created the process group (and so destroys it)
    sharded: bool = False  # FSDP2 (training.distributed: fsdp): gradients are reduce-scattered by FSDP itself

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_share(self, items: Sequence[T]) -> list[T]:
        """The items this rank processes: rank, rank + world_size, ..."""
        return list(items[self.rank::self.world_size])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum_floats(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks, in float64."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is True on at least one."""
        return self.sum_floats([1.0 if flag else 0.0], device)[0] > 0

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace each parameter's .grad by its sum over ranks (a missing .grad counts as zeros), with one
        all-reduce per gradient dtype over a flat buffer. Sharded runs: nothing to do (FSDP reduce-scatters)."""
        if not self.enabled or self.sharded:
            return
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj: T) -> list[T] | None:
        """Every rank's `obj` (picklable), in rank order, on rank 0 only (None elsewhere)."""
        if not self.enabled:
            return [obj]
        out: list | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Copy rank 0's values into every rank's parameters (a guard: equal seeds already give equal inits).
        Call it before sharding."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


SINGLE_PROCESS = DistContext()


def resolve_mode(mode: str, env: TorchrunEnv | None) -> str:
    """'single', 'ddp' or 'fsdp' for training.distributed `mode` in environment `env`."""
    if mode not in ("auto", "ddp", "fsdp"):
        raise QloraConfigError(f"training.distributed {mode!r}: allowed are 'auto', 'ddp' and 'fsdp'")
    world = env.world_size if env is not None else 1
    if mode in ("ddp", "fsdp") and env is None:
        raise QloraConfigError(f"training.distributed is {mode!r} but this process was not started by torchrun "
                               "(RANK/WORLD_SIZE unset); run `torchrun --nproc-per-node N -m qlorakit.cli train "
                               "CONFIG`, or set training.distributed: auto")
    if world == 1:
        return "single"
    return "fsdp" if mode == "fsdp" else "ddp"


def init_distributed(backend: str | None = None, mode: str = "auto") -> DistContext:
    """Join the process group torchrun describes and return this rank's context; a single-process context when
    not under torchrun (or WORLD_SIZE is 1 with mode 'auto').

    backend: 'gloo' or 'nccl'; None picks nccl when CUDA is available, else gloo. On CUDA the rank's device is
    set from LOCAL_RANK. An already initialised default group is used as it is (and left for its owner).
    """
    env = torchrun_env()
    resolved = resolve_mode(mode, env)
    if resolved == "single":
        return SINGLE_PROCESS
    assert env is not None
    for key, value in _COMM_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), env.local_rank, owns_group=owns,
                      sharded=resolved == "fsdp")
    log.info("qlorakit: data-parallel rank %d of %d (%s%s)", ctx.rank, ctx.world_size, dist.get_backend(),
             ", FSDP2" if ctx.sharded else "")
    return ctx


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if `ctx` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def check_batch_split(gradient_accumulation: int, ctx: DistContext) -> None:
    """Raise unless a step's micro-batches divide evenly over the ranks (so the global batch of a step is the
    single-process one and every rank does the same work)."""
    if gradient_accumulation % ctx.world_size:
        raise QloraConfigError(
            f"training.gradient_accumulation {gradient_accumulation} is not a multiple of the world size "
            f"{ctx.world_size}: each rank takes gradient_accumulation / world_size of a step's micro-batches, so "
            f"the global batch stays batch_size x gradient_accumulation; use a multiple of {ctx.world_size}")
