"""One rank of the FSDP2 packing test: `fsdp_worker.py MODEL_DIR`. Loads the tiny model in 4 bits, keeps its
packed bytes, shards it with qlorakit's FSDP2 path, and checks on every rank that each packed weight is a uint8
DTensor of which this rank holds a strict part, and that gathering it gives the original bytes."""

from __future__ import annotations

import logging
import sys

import torch

from qlorakit.model.loader import load_model
from qlorakit.model.lora_inject import inject_lora
from qlorakit.nn import Linear4bit
from qlorakit.sharding import full, is_sharded
from qlorakit.train.distributed import init_distributed, shutdown
from qlorakit.train.fsdp import shard_model

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    ctx = init_distributed(mode="fsdp")
    net, _ = load_model(sys.argv[1], compute_dtype=torch.float32, progress=False)
    inject_lora(net, "all-linear", r=4, alpha=8, dropout=0.0)
    before = {n: m.weight.clone() for n, m in net.named_modules() if isinstance(m, Linear4bit)}
    shard_model(net, torch.device("cpu"), ctx.world_size)
    checked = 0
    for name, m in net.named_modules():
        if isinstance(m, Linear4bit):
            w = m.weight
            assert is_sharded(w) and w.dtype == torch.uint8 and not w.requires_grad, (name, type(w), w.dtype)
            assert 0 < w.to_local().numel() < before[name].numel(), (name, w.to_local().shape)
            assert torch.equal(full(w), before[name]), name
            checked += 1
    assert checked == len(before) > 0
    print(f"rank {ctx.rank}: {checked} packed weights sharded as uint8 and gathered unchanged", flush=True)
    shutdown(ctx)
