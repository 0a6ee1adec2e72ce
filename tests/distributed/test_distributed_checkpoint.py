"""Checkpoints of a data-parallel run keep every rank's RNG states (their LoRA-dropout streams differ), and each
rank resumes with its own; a rank the checkpoint has no states for resumes with rank 0's."""

from __future__ import annotations

import torch
from torch import nn

from qlorakit.model.lora_inject import inject_lora
from qlorakit.train.checkpoint import capture_rng, load_checkpoint, save_checkpoint


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)


def _tiny_lora() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _Tiny()
    inject_lora(model, ["proj"], r=2, alpha=4, dropout=0.1)
    return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)


def test_each_rank_resumes_with_its_own_rng_states(tmp_path):
    model, optimizer = _tiny_lora()
    torch.manual_seed(0)
    rank0 = capture_rng()
    torch.manual_seed(1)
    rank1 = capture_rng()
    ckpt = save_checkpoint(tmp_path, 3, model, optimizer, {"epoch": 0, "batch_index": 3}, {}, None,
                           rng=rank0, other_ranks_rng=[rank1])
    assert (ckpt / "rng-rank1.safetensors").is_file()

    for rank, expected in ((0, rank0), (1, rank1), (2, rank0)):
        torch.manual_seed(99)
        state = load_checkpoint(ckpt, *_tiny_lora(), rank=rank)
        assert state["step"] == 3
        assert torch.equal(torch.get_rng_state(), expected[0]["torch_cpu"]), rank
