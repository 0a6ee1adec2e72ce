"""The streaming safetensors writer produces files that the safetensors library reads back exactly."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qlorakit.errors import CheckpointFormatError
from qlorakit.model.safetensors_writer import SafetensorsWriter


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "odd_bytes": torch.randint(0, 256, (7,), dtype=torch.uint8, generator=g),  # written first, odd length
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f32": torch.randn(4, 3, generator=g),
        "f64": torch.randn(2, generator=g, dtype=torch.float64),
        "i64": torch.arange(5),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5, dtype=torch.float16),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(3, 4, generator=g).t(),  # not contiguous
    }


def test_round_trip_with_every_alignment(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = mixed_tensors()
    with SafetensorsWriter(path, metadata={"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)

    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_len % 8 == 0
    assert writer.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"], "spool files left behind"


def test_failure_leaves_no_file(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointFormatError, match="written twice"):
        with SafetensorsWriter(path) as writer:
            writer.add("a", torch.zeros(2))
            writer.add("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []
