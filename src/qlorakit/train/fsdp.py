"""Sharded data parallelism (training.distributed: fsdp) with PyTorch's FSDP2 (`fully_shard`).

Every parameter of the model is split along its first dimension over the ranks and gathered for each block's
forward and backward: the frozen embeddings, norms and head, the LoRA adapters (their gradients reduce-scatter,
so each rank holds and updates only its shard, and the optimizer keeps states for that shard only), and the
packed 4-bit weights. Those are uint8 tensors [bytes, 1]; for FSDP they become frozen uint8 parameters and are
sharded, gathered and freed as uint8, never viewed as a float dtype, so the gathered bytes are the quantized
bytes exactly. Their small quantization constants (absmax, nested constants, code book) stay replicated
buffers. No mixed-precision policy is set: every tensor is gathered in the dtype it is stored in.

A step's micro-batches are dealt out as in DDP (distributed.py); the backward of all but a rank's last
micro-batch keeps its gradients unsharded and local (no reduce-scatter), and the gradients are summed over
ranks (divide factor 1), as the loss is already normalised by the step's global target count.

Collectives need every rank: saving the adapter gathers it on all ranks (rank 0 writes), evaluation gives each
rank the same number of forwards, and Ctrl-C (which may stop ranks anywhere) saves nothing beyond the last
checkpoint. Loading quantizes the whole model on every rank before sharding (peak memory per rank: the full
4-bit model once), then frees what the rank does not own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..sharding import full

log = logging.getLogger("qlorakit.train")


def integer_parameters_shardable() -> bool:
    """Whether this torch's FSDP2 can shard a frozen uint8 parameter (torch >= 2.13: measured; 2.11 fails with
    'only Tensors of floating point dtype can require gradients' inside fully_shard)."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 13)


def _packed_to_parameters(model: nn.Module) -> int:
    """Re-register every Linear4bit's packed weight buffer as a frozen uint8 parameter (FSDP shards parameters
    only); returns the number of bytes converted."""
    from ..nn.linear4bit import Linear4bit

    total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit) and "weight" in m._buffers:
            packed = m._buffers.pop("weight")
            m.register_parameter("weight", nn.Parameter(packed, requires_grad=False))
            total += packed.numel()
    return total


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (model.model.layers for transformers' causal LMs)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, Iterable):
        return list(layers)
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


class LossRoot(nn.Module):
    """The FSDP root: the training loss computed from the decoder and the head weight, as `forward_loss_sum`
    does unsharded. It has to be one module's forward, since FSDP gathers the parameters outside the blocks
    (embeddings, final norm, head: tied or not) in its root module's forward hooks, and the loss reads the head's
    weight directly (the chunked cross-entropy) instead of calling the head."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        from .loss import decoder_loss_sum

        return decoder_loss_sum(self.lm, inputs, labels)


def loss_root(model: nn.Module) -> LossRoot | None:
    """The LossRoot that shard_model attached to `model`, or None for an unsharded model."""
    return model.__dict__.get("_qlorakit_fsdp_root")


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Apply fully_shard to every block, then to a LossRoot over the whole model (attached to `model`, see
    loss_root), on a 1-D mesh of all ranks. Returns `model`, its parameters now sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    if integer_parameters_shardable():
        packed = _packed_to_parameters(model)
    else:
        packed = 0
        log.warning("qlorakit: FSDP2 in torch %s cannot shard integer parameters (it asks them to require "
                    "gradients; fixed in torch 2.13): the packed 4-bit weights stay whole on every rank, the rest is "
                    "sharded", torch.__version__)
    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    root = LossRoot(model)
    fully_shard(root, mesh=mesh)
    model.__dict__["_qlorakit_fsdp_root"] = root  # not a submodule: no cycle in modules() or state_dict()
    for m in [*blocks, root]:
        # Sum over ranks (the loss is already divided by the global target count), as a plain SUM reduction:
        # gloo has no PREMUL_SUM, which a divide factor alone would ask for.
        m.set_gradient_divide_factor(1.0)
        force_sum = getattr(m, "set_force_sum_reduction_for_comms", None)
        if force_sum is not None:
            force_sum(True)
    log.info("qlorakit: FSDP2 over %d ranks: %d blocks and the rest of the model sharded; %.2f MiB of packed 4-bit "
             "weights sharded as uint8", world_size, len(blocks), packed / 2**20)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP: reduce-scatter gradients after the next backward (sync) or keep accumulating them unsharded."""
    root = loss_root(model)
    if root is not None:
        root.set_requires_gradient_sync(sync)  # recurses into the blocks


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor norm is gathered first)."""
    return float(full(norm))
