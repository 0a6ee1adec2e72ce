"""Tensors that may be sharded DTensors (parameters and gradients under FSDP2, train/fsdp.py): this rank's
shard, the whole tensor, and copying a whole tensor into a shard. Plain tensors pass through unchanged."""

from __future__ import annotations

import torch


def is_sharded(t: torch.Tensor | None) -> bool:
    """True for a DTensor (a parameter or gradient that FSDP2 sharded)."""
    if t is None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed
        return False
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the same storage), or `t` itself."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective: every rank must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def copy_whole_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) where dst may be a sharded parameter and src the whole tensor (the same on every rank):
    each rank copies its own slice, without communication."""
    if is_sharded(dst):
        from torch.distributed.tensor import distribute_tensor

        part = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(part.to_local())
    else:
        dst.copy_(src.to(dst.dtype))
