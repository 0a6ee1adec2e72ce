"""Training checkpoints: written to a temporary folder and renamed, resumable exactly.

A checkpoint folder `checkpoints/step-000120/` holds the adapter in PEFT format (so any checkpoint is a usable
adapter), the optimizer state as safetensors + JSON (no pickle), the RNG states, trainer_state.json (step, data
position, schedule, the run's settings) and manifest.json (size and sha256 of every other file). It is written
whole in a hidden temporary folder, manifest last, and renamed into place; `checkpoints/latest` then names it.
Resume takes the newest checkpoint whose files match its manifest, and names any damaged one it skips. A data-parallel run adds the RNG
states of ranks 1.. (`rng-rank1.safetensors`, ...), since their dropout streams differ from rank 0's. A sharded
(FSDP2) run adds each rank's optimizer shard (`optimizer-rank1.safetensors` + `.json`, ...; rank 0's in the usual
files) and resumes only with the same number of ranks.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..adapters.peft_format import load_adapter, save_adapter
from ..atomic import swap_in, write_text
from ..errors import CheckpointFormatError, CheckpointWriteError, QlorakitError
from .manifest import MANIFEST_NAME, fsync_dir, verify_manifest, write_manifest

log = logging.getLogger("qlorakit.train")

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

    tmp = ckpt_root / f".{final.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        save_adapter(model, tmp, base_model_name_or_path=base_model_name, qlorakit_record=adapter_record,
                     tensors=adapter_tensors)
        for rank, (opt_tensors, opt_meta) in enumerate(optims):
            tensors_name, meta_name = _rank_optim_files(rank)
            save_file(opt_tensors, str(tmp / tensors_name))
            _write_json(tmp / meta_name, opt_meta)
        for rank, tensors in enumerate([rng_tensors] + [t for t, _ in other_ranks_rng or []]):
            save_file(tensors, str(tmp / _rank_rng_file(rank)))
        _write_json(tmp / STATE_NAME, state)
        write_manifest(tmp)  # last: a folder with a manifest is complete
        # an incomplete or damaged folder of this step, from an earlier attempt, is set aside and replaced
        swap_in(tmp, final, aside=ckpt_root / f".{final.name}.old-{os.getpid()}")
        write_text(ckpt_root / "latest", final.name + "\n")
        fsync_dir(ckpt_root)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        kept = f"the newest checkpoint, {previous.name}, is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"{final}: writing the checkpoint failed ({write_error_text(err)}); {kept}; "
                                   "fix that (free some space?) and run the same command to resume") from None
    _prune(ckpt_root, keep)
    return final


def write_error_text(err: BaseException) -> str:
    """What went wrong in a failed write, in the system's words (safetensors wraps them in its own message)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return os.strerror(errno.ENOSPC) if os.strerror(errno.ENOSPC) in text else text


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def _is_complete(folder: Path) -> bool:
    """A manifest; or a trainer_state.json in a checkpoint from before manifests (this version renames a folder
    into place only once its manifest is written, so it never leaves a step folder without one)."""
    return (folder / MANIFEST_NAME).is_file() or (folder / STATE_NAME).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders under root/checkpoints, oldest first."""
    ckpt_root = Path(root) / "checkpoints"
    return sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and _is_complete(p))


def _prune(ckpt_root: Path, keep: int) -> None:
    for old in complete_checkpoints(ckpt_root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# What a killed run can leave directly in its output folder: the final adapter's (and a loftq run's 16-bit export's)
# temporary and set-aside folders (adapters/peft_format.py), and the temporary files of summary.json, config.yaml,
# metrics.jsonl (atomic.py) and loss.png.
_OUTPUT_LEFTOVERS = (".adapter.tmp-*", ".adapter.old-*", ".adapter-16bit.tmp-*", ".adapter-16bit.old-*", ".*.tmp",
                     "loss.tmp.png")


def remove_leftovers(root: Path) -> list[str]:
    """Delete what killed writes left in the output folder `root`: under checkpoints/, hidden temporary and
    set-aside folders and step folders without a manifest; beside it, the temporary names of the run's own
    files. Only for the one run that holds the output folder's lock. Returns the names removed."""
    root = Path(root)
    ckpt_root = root / "checkpoints"
    found = [p for pattern in _OUTPUT_LEFTOVERS for p in root.glob(pattern)]
    if ckpt_root.is_dir():
        # save_checkpoint's temporary names: .step-N.tmp-PID / .step-N.old-PID, and save_adapter's inside them
        found += [p for p in ckpt_root.iterdir() if p.name.startswith((".step-", "..step-", ".latest."))
                  or (p.is_dir() and p.name.startswith("step-") and not _is_complete(p))]
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return sorted(str(p.relative_to(root)) for p in found)


def remove_checkpoints(root: Path) -> list[str]:
    """training.resume false: delete this run's checkpoints (complete step folders and `latest`) and what killed
    writes left, nothing else that may sit in root/checkpoints. Returns the names removed."""
    ckpt_root = Path(root) / "checkpoints"
    removed = remove_leftovers(root)
    if ckpt_root.is_dir():
        for p in complete_checkpoints(root) + [ckpt_root / "latest"]:
            if p.exists():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(str(p.relative_to(root)))
        if not any(ckpt_root.iterdir()):
            ckpt_root.rmdir()
    return removed


def find_intact_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint whose files match its manifest, or None; the newer ones skipped, each with
    what is wrong with it). Checkpoints from before manifests are taken as they are."""
    skipped: list[tuple[Path, str]] = []
    for cand in reversed(complete_checkpoints(root)):
        problem = verify_manifest(cand) if (cand / MANIFEST_NAME).is_file() else None
        if problem is None:
            return cand, skipped
        skipped.append((cand, problem))
    return None, skipped


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root/checkpoints (the one `latest` names), or None. Not verified:
    find_intact_checkpoint() checks the files."""
    ckpt_root = Path(root) / "checkpoints"
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        cand = ckpt_root / pointer.read_text().strip()
        if cand.name.startswith("step-") and cand.is_dir() and _is_complete(cand):
            return cand
    complete = complete_checkpoints(root)
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
        load_adapter(model, path, require_init=True)
        tensors_name, meta_name = _rank_optim_files(rank if shards else 0)
        with safe_open(str(path / tensors_name), framework="pt") as f:
            opt_tensors = {k: f.get_tensor(k) for k in f.keys()}
        _optimizer_from_files(optimizer, opt_tensors, json.loads((path / meta_name).read_text()))
        own = str(rank) in state.get("rng_ranks", {}) and (path / _rank_rng_file(rank)).is_file()
        with safe_open(str(path / _rank_rng_file(rank if own else 0)), framework="pt") as f:
            rng_tensors = {k: f.get_tensor(k) for k in f.keys()}
        _restore_rng(rng_tensors, state["rng_ranks"][str(rank)] if own else state["rng"])
    except QlorakitError:
        raise
    except Exception as err:  # safetensors, torch and random each raise their own types for damaged input
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointFormatError(f"{path}: cannot resume from this checkpoint ({first}); move it away to "
                                    "resume from an older one, or set training.resume: false") from None
    return state
