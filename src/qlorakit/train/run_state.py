"""What makes a run folder safe to continue: one run at a time (a lock), and resume only from an intact checkpoint
written with the same settings.

A run's settings are recorded in every checkpoint's trainer_state.json as two groups: `exact`, the values that
decide the result (data, model, quantization, LoRA shape, batch and accumulation, seed, optimizer, schedule,
number of ranks), and `free`, those that do not change a step's arithmetic or only its length (eval, save and
log frequency, kept checkpoints, max_steps / epochs). Resuming with a different `exact` value is refused with
the list of differences unless `training.resume: force`; `free` differences are logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointFormatError, RunConflictError

log = logging.getLogger("qlorakit.train")

LOCK_NAME = ".qlorakit-train.lock"


class OutputLock:
    """An exclusive advisory lock on `<output_dir>/.qlorakit-train.lock`, held for the whole run. The kernel drops
    it when the process ends in any way (SIGKILL included), so a crashed run never leaves the folder locked."""

    def __init__(self, output_dir: Path):
        import fcntl

        self.path = Path(output_dir) / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 64).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise RunConflictError(
                f"{output_dir}: another `qlorakit train` is writing to this output_dir (pid {holder}); wait for it "
                "to finish, stop it, or set another training.output_dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def examples_fingerprint(*example_sets: Any) -> str:
    """sha256 (16 hex digits) of tokenised examples (ids, labels and boundaries of each set, None for no set):
    the same data file, tokenizer, template and length limits give the same value."""
    h = hashlib.sha256()
    for ex in example_sets:
        if ex is None:
            h.update(b"none")
            continue
        for arr in (ex.fingerprint_arrays() if hasattr(ex, "fingerprint_arrays") else (ex.ids, ex.labels, ex.offsets)):
            h.update(np.ascontiguousarray(arr).tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


@dataclass
class ResumePlan:
    """checkpoint: where to continue from (None: from the start); finished: the run already reached its last
    step (nothing to train); notes: what was logged about the choice."""

    checkpoint: Path | None = None
    finished: bool = False
    step: int = 0
    notes: list[str] = field(default_factory=list)


def legacy_settings_hash(settings: dict[str, Any]) -> str:
    """The settings_hash that checkpoints of qlorakit 0.1 recorded, of the same six values in `settings`."""
    keys = ("seed", "batch_size", "gradient_accumulation", "max_seq_length", "packing", "learning_rate")
    blob = json.dumps({k: settings.get("exact", {}).get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compare_settings(stored: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(differences in `exact`, differences in `free`), each as 'key: old -> new'."""
    def diffs(group: str) -> list[str]:
        old, new = stored.get(group, {}), current.get(group, {})
        return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
    return diffs("exact"), diffs("free")


def plan_resume(output_dir: Path, settings: dict[str, Any], mode: bool | str, total_steps: int,
                adapter_name: str = "adapter") -> ResumePlan:
    """Choose what a run in `output_dir` continues from.

    mode: training.resume (True, 'force' or False). The newest checkpoint whose files match its manifest is
    taken; newer damaged ones are named and skipped. Raises RunConflictError listing the differences when the
    checkpoint's exact settings differ from `settings` (unless mode is 'force'), and CheckpointFormatError when
    every checkpoint is damaged.
    """
    from .checkpoint import STATE_NAME, find_intact_checkpoint

    plan = ResumePlan()
    if not mode:
        return plan
    ckpt, skipped = find_intact_checkpoint(output_dir)
    for bad, problem in skipped:
        note = f"qlorakit: checkpoint {bad} is damaged ({problem}); skipped"
        log.warning(note)
        plan.notes.append(note)
    if ckpt is None:
        if skipped:
            raise CheckpointFormatError(
                f"{skipped[-1][0].parent}: no intact checkpoint to resume from ({skipped[0][0].name}: "
                f"{skipped[0][1]}); move the damaged ones away or set training.resume: false to start over")
        return plan
    try:
        state = json.loads((ckpt / STATE_NAME).read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointFormatError(f"{ckpt / STATE_NAME}: unreadable ({type(err).__name__}); move the "
                                    "checkpoint away or set training.resume: false") from None
    stored = state.get("settings")
    if stored is None:
        # Written by qlorakit 0.1 before the settings were recorded: it kept a hash of six of them.
        if "settings_hash" in state and state["settings_hash"] != legacy_settings_hash(settings) and mode != "force":
            raise RunConflictError(
                f"{ckpt}: written with another seed, batch_size, gradient_accumulation, max_seq_length, packing or "
                "learning_rate (its settings_hash differs); resuming would silently mix two runs. Use another "
                "training.output_dir, set training.resume: force to continue anyway, or training.resume: false "
                "to start over")
        note = f"qlorakit: {ckpt} was written before all settings were recorded; only six were compared"
        log.warning(note)
        plan.notes.append(note)
    else:
        exact, free = compare_settings(stored, settings)
        if exact and mode != "force":
            raise RunConflictError(
                f"{ckpt}: written with other settings that change the result ({'; '.join(exact)}); resuming would "
                "silently mix two runs. Use another training.output_dir, set training.resume: force to continue "
                "anyway, or training.resume: false to start over")
        if exact:
            note = f"qlorakit: resuming from {ckpt} despite changed settings (training.resume: force): " \
                   + "; ".join(exact)
            log.warning(note)
            plan.notes.append(note)
        if free:
            note = "qlorakit: settings changed since the checkpoint (they do not change a step): " + "; ".join(free)
            log.info(note)
            plan.notes.append(note)
    plan.checkpoint, plan.step = ckpt, step
    if step >= total_steps and (Path(output_dir) / adapter_name).is_dir():
        plan.finished = True
    return plan
