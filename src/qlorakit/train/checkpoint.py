"""Training checkpoints: written to a temporary folder and renamed, resumable exactly.

A checkpoint folder `checkpoints/step-000120/` holds the adapter in PEFT format (so any checkpoint is a usable
adapter), the optimizer state as safetensors + JSON (no pickle), the RNG states, and trainer_state.json (step,
data position, schedule). `checkpoints/latest` names the newest complete one. A data-parallel run adds the RNG
states of ranks 1.. (`rng-rank1.safetensors`, ...), since their dropout streams differ from rank 0's. A sharded
(FSDP2) run adds each rank's optimizer shard (`optimizer-rank1.safetensors` + `.json`, ...; rank 0's in the usual
files) and resumes only with the same number of ranks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..adapters.peft_format import load_adapter, save_adapter
from ..errors import CheckpointFormatError

STATE_NAME = "trainer_state.json"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
RNG_TENSORS = "rng.safetensors"


def _rank_rng_file(rank: int) -> str:
    return RNG_TENSORS if rank == 0 else f"rng-rank{rank}.safetensors"


def _rank_optim_files(rank: int) -> tuple[str, str]:
    return (OPTIM_TENSORS, OPTIM_META) if rank == 0 else (f"optimizer-rank{rank}.safetensors",
                                                          f"optimizer-rank{rank}.json")


def optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state as (CPU tensors, JSON-able metadata): what a checkpoint stores for one rank."""
    return _optimizer_to_files(optimizer)


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


RngStates = tuple[dict[str, torch.Tensor], dict[str, Any]]


def capture_rng() -> RngStates:
    """The torch (CPU and every CUDA device) and Python RNG states, as (tensors, JSON-able meta)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    adapter_record: dict[str, Any],
    base_model_name: str | None,
    keep: int = 2,
    rng: RngStates | None = None,
    other_ranks_rng: list[RngStates] | None = None,
    adapter_tensors: dict[str, torch.Tensor] | None = None,
    other_ranks_optimizer: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
) -> Path:
    """Write checkpoint `step` under root/checkpoints atomically, point `latest` at it, prune old ones.

    rng: the RNG states a resumed run starts step `step + 1` with (capture_rng() at the end of step `step`);
    None captures them now. other_ranks_rng: those of ranks 1, 2, ... of a data-parallel run. Sharded runs:
    adapter_tensors, the adapter gathered whole (lora_state_dict), and other_ranks_optimizer, the optimizer
    shards of ranks 1, 2, ... (optimizer_files()).
    """
    ckpt_root = Path(root) / "checkpoints"
    final = ckpt_root / f"step-{step:06d}"
    optims = [_optimizer_to_files(optimizer)] + list(other_ranks_optimizer or [])
    rng_tensors, rng_meta = rng if rng is not None else capture_rng()
    state = dict(trainer_state, step=step, rng=rng_meta)
    if other_ranks_rng:
        state["rng_ranks"] = {str(r): meta for r, (_, meta) in enumerate(other_ranks_rng, start=1)}
    if other_ranks_optimizer is not None:
        state["optimizer_shards"] = len(optims)

    save_adapter(model, final, base_model_name_or_path=base_model_name, qlorakit_record=adapter_record,
                 tensors=adapter_tensors)
    # The adapter folder was renamed into place; the training state is added with per-file atomic writes and
    # trainer_state.json last, so a folder without it is incomplete and never resumed from.
    for rank, (opt_tensors, opt_meta) in enumerate(optims):
        tensors_name, meta_name = _rank_optim_files(rank)
        save_file(opt_tensors, str(final / (tensors_name + ".tmp")))
        os.replace(final / (tensors_name + ".tmp"), final / tensors_name)
        _write_json(final / meta_name, opt_meta)
    for rank, tensors in enumerate([rng_tensors] + [t for t, _ in other_ranks_rng or []]):
        name = _rank_rng_file(rank)
        save_file(tensors, str(final / (name + ".tmp")))
        os.replace(final / (name + ".tmp"), final / name)
    _write_json(final / STATE_NAME, state)
    (ckpt_root / "latest.tmp").write_text(final.name + "\n")
    os.replace(ckpt_root / "latest.tmp", ckpt_root / "latest")
    _prune(ckpt_root, keep)
    return final


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _prune(ckpt_root: Path, keep: int) -> None:
    complete = sorted(p for p in ckpt_root.glob("step-*") if (p / STATE_NAME).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root/checkpoints, or None."""
    ckpt_root = Path(root) / "checkpoints"
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        cand = ckpt_root / pointer.read_text().strip()
        if (cand / STATE_NAME).is_file():
            return cand
    complete = sorted(p for p in ckpt_root.glob("step-*") if (p / STATE_NAME).is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                    sharded_world: int | None = None) -> dict[str, Any]:
    """Restore adapter weights, optimizer state and RNG states; return the trainer state.

    rank: of a data-parallel run; it restores its own RNG states where the checkpoint has them (a checkpoint
    written without them, e.g. on Ctrl-C, or by a run with fewer ranks, gives rank 0's). sharded_world: the
    number of ranks of a sharded (FSDP2) run, whose optimizer shards only a checkpoint of as many ranks holds.
    """
    path = Path(path)
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointFormatError(f"{path}: cannot resume from this checkpoint ({err})") from None
    shards = state.get("optimizer_shards")
    if shards != sharded_world:
        written = f"a sharded (fsdp) run of {shards} ranks" if shards else "an unsharded run"
        running = f"a sharded (fsdp) run of {sharded_world} ranks" if sharded_world else "an unsharded run"
        raise CheckpointFormatError(
            f"{path}: written by {written}, resumed by {running}; the optimizer states are split by rank, so "
            "resume with the same training.distributed and number of processes (or set training.resume: false)")
    try:
        load_adapter(model, path)
        tensors_name, meta_name = _rank_optim_files(rank if shards else 0)
        with safe_open(str(path / tensors_name), framework="pt") as f:
            opt_tensors = {k: f.get_tensor(k) for k in f.keys()}
        _optimizer_from_files(optimizer, opt_tensors, json.loads((path / meta_name).read_text()))
        own = str(rank) in state.get("rng_ranks", {}) and (path / _rank_rng_file(rank)).is_file()
        with safe_open(str(path / _rank_rng_file(rank if own else 0)), framework="pt") as f:
            rng_tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: cannot resume from this checkpoint ({err})") from None
    _restore_rng(rng_tensors, state["rng_ranks"][str(rank)] if own else state["rng"])
    return state
