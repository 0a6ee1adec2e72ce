"""The adapters `qlorakit serve` holds: `NAME=DIR` specs, each adapter read and checked against the base's
fingerprint before the base loads, its tensors in the compute dtype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterMismatchError, QlorakitError


@dataclass
class AdapterWeights:
    """One adapter, ready to swap in: module path -> (lora_A [r, in], lora_B [out, r]) in the compute dtype."""

    name: str
    path: Path
    scaling: float
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: dict[str, Any]  # its adapter_config.json
    record: dict[str, Any]  # its qlorakit record ({} when saved without one)


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """`NAME=DIR` strings -> {NAME: DIR}; QlorakitError for a malformed or repeated NAME."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise QlorakitError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter support=runs/support/adapter")
        if name in out:
            raise QlorakitError(f"--adapter {spec!r}: the name {name!r} is given twice")
        out[name] = Path(folder)
    return out


def _read_adapter_weights(name: str, folder: Path, dtype: torch.dtype, fingerprint: str, force: bool
                          ) -> AdapterWeights:
    from ..adapters.peft_format import adapter_modules, read_adapter
    from ..nn.lora import lora_scaling

    config, tensors, record = read_adapter(folder)  # checked (keys, pairs, ranks against r) before the base loads
    saved = record.get("base_fingerprint")
    if saved and saved != fingerprint and not force:
        raise AdapterMismatchError(f"{folder}: adapter {name!r} was trained on another base model (fingerprint "
                                   f"{saved[:12]}, this base is {fingerprint[:12]}); use --force to serve it anyway")
    scaling = lora_scaling(config["r"], float(config["lora_alpha"]), bool(config.get("use_rslora")))
    modules = {module: (a.to(dtype), b.to(dtype)) for module, (a, b) in adapter_modules(tensors).items()}
    return AdapterWeights(name, folder, scaling, modules, config, record)
