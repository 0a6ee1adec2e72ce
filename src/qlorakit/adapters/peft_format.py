"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors (no pickle).

Tensor keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, what PEFT's
`PeftModel.from_pretrained` and vLLM load. The config has no DoRA and no modules_to_save, so vLLM accepts it.
qlorakit's own record (the base model's identity, the quantization used, training facts) goes into a sidecar
`qlorakit_adapter.json` and the safetensors metadata, because PEFT warns about unknown keys in
adapter_config.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import AdapterMismatchError, CheckpointFormatError
from ..nn.lora import LoraLinear
from ..sharding import copy_whole_into, full

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SIDECAR_NAME = "qlorakit_adapter.json"


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-keyed LoRA tensors of `model` (contiguous CPU copies, in the adapter dtype). Sharded (FSDP2) adapters
    are gathered whole: then every rank must call this together."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = full(m.lora_A.weight.detach()).to("cpu").contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = full(m.lora_B.weight.detach()).to("cpu").contiguous()
    return out


def _target_modules(names: list[str], model: nn.Module) -> list[str]:
    """Leaf names (e.g. q_proj) when they pick out exactly the adapted modules, else the full paths."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    adapted = set(names)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in leaves and name not in adapted and not _inside_lora(name, adapted):
            if isinstance(module, (nn.Linear, LoraLinear)) or hasattr(module, "in_features"):
                return sorted(names)
    return leaves


def _inside_lora(name: str, adapted: set[str]) -> bool:
    return any(name.startswith(a + ".") for a in adapted)


def peft_adapter_config(model: nn.Module, base_model_name_or_path: str | None) -> dict[str, Any]:
    mods = lora_modules(model)
    if not mods:
        raise CheckpointFormatError("the model has no LoRA layers to save")
    first = next(iter(mods.values()))
    ranks = {m.r for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise CheckpointFormatError(f"LoRA layers differ in rank/alpha ({sorted(ranks)}, {sorted(alphas)}); "
                                    "qlorakit saves adapters with one rank and alpha")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(list(mods), model),
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "bias": "none",
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _atomic_dir_write(out_dir: Path, write: Any) -> Path:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    qlorakit_record: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter of `model` to `out_dir` atomically (temporary folder, then rename). `tensors`: its
    lora_state_dict, when already gathered (sharded runs gather on every rank, then one rank writes)."""
    tensors = lora_state_dict(model) if tensors is None else tensors
    config = peft_adapter_config(model, base_model_name_or_path)
    record = dict(qlorakit_record or {})
    meta = {"format": "pt"}
    if "base_fingerprint" in record:
        meta["qlorakit.base_fingerprint"] = str(record["base_fingerprint"])

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / SIDECAR_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    return _atomic_dir_write(Path(out_dir), write)


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter_config, tensors keyed as saved, qlorakit record or {}) of a PEFT adapter folder."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise CheckpointFormatError(f"{d}: adapter folder not found")
    for p in (cfg_path, w_path):
        if not p.is_file():
            extra = " (adapter_model.bin is not loaded: pickle files can run code)" if p == w_path else ""
            raise CheckpointFormatError(f"{d}: missing {p.name}{extra}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{cfg_path}: not valid JSON ({err})") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise CheckpointFormatError(f"{cfg_path}: only plain LoRA adapters are supported "
                                    f"(peft_type={config.get('peft_type')!r}, use_dora={config.get('use_dora')})")
    with safe_open(str(w_path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    sidecar = d / SIDECAR_NAME
    record = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    return config, tensors, record


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    *,
    base_fingerprint: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Copy a saved adapter's tensors into the LoraLinear layers of `model` (already injected, same shapes).

    If both the adapter and the caller know the base model's fingerprint and they differ, refuse with
    AdapterMismatchError unless force. Returns the adapter's qlorakit record.
    """
    _, tensors, record = read_adapter(adapter_dir)
    saved_fp = record.get("base_fingerprint")
    if base_fingerprint and saved_fp and saved_fp != base_fingerprint and not force:
        raise AdapterMismatchError(
            f"{adapter_dir}: adapter was trained on another base model (fingerprint {saved_fp[:12]}, "
            f"base {record.get('base_model', '?')}), this base is {base_fingerprint[:12]}; "
            "use --force to load it anyway"
        )
    mods = lora_modules(model)
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        sample = sorted(missing or unexpected)[0]
        raise CheckpointFormatError(
            f"{adapter_dir}: adapter does not fit this model ({len(missing)} LoRA tensors missing, "
            f"{len(unexpected)} unexpected, e.g. {sample!r})"
        )
    with torch.no_grad():
        for name, m in mods.items():
            for ab, lin in (("A", m.lora_A), ("B", m.lora_B)):
                t = tensors[f"{PEFT_PREFIX}{name}.lora_{ab}.weight"]
                if t.shape != lin.weight.shape:
                    raise CheckpointFormatError(f"{adapter_dir}: {name}.lora_{ab} has shape {list(t.shape)}, "
                                                f"the model expects {list(lin.weight.shape)}")
                copy_whole_into(lin.weight, t)
    return record
