"""Write a .safetensors file tensor by tensor, holding only the tensor being added in memory.

`safetensors.torch.save_file` needs every tensor of a file at once; a quantized checkpoint is produced one tensor
at a time, so this writer spools tensor bytes to temporary files, one per element size, and assembles the file on
close: an 8-byte little-endian header length, the JSON header (padded with spaces to a multiple of 8), then the
data, widest elements first. That order keeps every tensor aligned to its element size, as safetensors' own
writer does, and the data regions are contiguous, as readers require.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import CheckpointFormatError

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}


class SafetensorsWriter:
    """Use as a context manager; `add(name, tensor)` per tensor. The file appears complete on a clean exit.

    Temporary spool files live next to `path` and are removed in every case.
    """

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._spools: dict[int, BinaryIO] = {}
        self._entries: dict[str, tuple[str, list[int], int, int, int]] = {}  # dtype, shape, size, start, end
        self.nbytes = 0

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            for spool in self._spools.values():
                spool.close()
            self._spools.clear()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (any device; copied to the CPU). Names must be unique within the file."""
        if name in self._entries:
            raise CheckpointFormatError(f"{self.path}: tensor {name!r} written twice")
        dtype_name = _DTYPE_NAMES.get(tensor.dtype)
        if dtype_name is None:
            raise CheckpointFormatError(
                f"{self.path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        size = tensor.element_size()
        spool = self._spools.get(size)
        if spool is None:
            spool = self._spools[size] = tempfile.TemporaryFile(dir=self.path.parent)
        start = spool.tell()
        if data.numel():
            spool.write(data.numpy().data)
        self._entries[name] = (dtype_name, list(tensor.shape), size, start, start + data.numel())
        self.nbytes += data.numel()

    def _finish(self) -> None:
        group_start, offset = {}, 0
        for size in sorted(self._spools, reverse=True):
            group_start[size] = offset
            offset += self._spools[size].tell()
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        for name, (dtype_name, shape, size, start, end) in self._entries.items():
            base = group_start.get(size, 0)
            header[name] = {"dtype": dtype_name, "shape": shape, "data_offsets": [base + start, base + end]}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for size in sorted(self._spools, reverse=True):
                spool = self._spools[size]
                spool.seek(0)
                shutil.copyfileobj(spool, out, length=16 << 20)
