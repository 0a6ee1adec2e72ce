"""Checks `qlorakit train` can run before it loads anything: folders it can write, and disk space for what it
will write into them. Each failure is one line naming the path, what is wrong and what would do. And one piece of
advice: a 4-bit type other than NF4 measured against NF4 on the model's weights.

Lower layers take plain arguments: `what` is the name the user knows the path by (a config key such as
`training.output_dir`), used in the message.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DiskSpaceError, OutputDirError, QlorakitError

log = logging.getLogger("qlorakit.train")

CHECKPOINT_OVERHEAD_BYTES = 1 << 20
"""Per checkpoint, beyond its tensors: JSON (trainer state, optimizer groups, adapter config), RNG states and
safetensors headers. A few KiB in practice; 1 MiB is ample."""


def format_bytes(n: int) -> str:
    """`n` bytes for a message: '512 B', '3.0 KiB', '1.5 GiB', ... (binary units, one decimal)."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _nearest_existing(path: Path) -> Path:
    """`path` itself when it exists, else its closest existing ancestor (what the OS will create it under)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def check_writable_dir(path: str | Path, what: str) -> Path:
    """`path`, an existing folder, when this process can create a file in it. Tried with a temporary file rather
    than os.access, which says yes to root and knows nothing of read-only mounts. OutputDirError otherwise."""
    p = Path(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".qlorakit-write-test-", dir=p)
    except OSError as err:
        raise OutputDirError(f"{what} {p}: not writable ({err.strerror or err}); choose another folder or fix its "
                             "permissions") from None
    os.close(fd)
    os.unlink(probe)
    return p


def check_output_dir(path: str | Path, what: str = "training.output_dir") -> Path:
    """`path` as a folder that exists and that this process can write; created, with its parents, when missing.

    OutputDirError (one line) when it is a file, lies under a file, cannot be created, or is not writable.
    """
    p = Path(path).expanduser()
    existing = _nearest_existing(p)
    if existing == p and not p.is_dir():
        raise OutputDirError(f"{what} {p}: is a file, not a folder; choose another {what} or move the file")
    if existing != p and not existing.is_dir():
        raise OutputDirError(f"{what} {p}: lies under {existing}, which is a file, not a folder; choose another "
                             f"{what} or move the file")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputDirError(f"{what} {p}: cannot be created ({err.strerror or err}); choose another {what} or "
                             f"fix the permissions of {existing}") from None
    return check_writable_dir(p, what)


def check_free_disk(path: str | Path, need_bytes: int, what: str) -> int:
    """The free bytes on the disk that holds `path` (or would: a missing path counts its closest existing
    ancestor). DiskSpaceError (one line: what, how much it needs, how much is free) when fewer than need_bytes."""
    p = Path(path).expanduser()
    free = shutil.disk_usage(_nearest_existing(p)).free
    if free < need_bytes:
        raise DiskSpaceError(f"{p}: {what} needs about {format_bytes(need_bytes)} and only {format_bytes(free)} is "
                             "free on that disk; free some space or choose a folder on another disk")
    return free


def checkpoint_bytes(trainable_params: int, adapter_bytes_per_param: int, state_bits: int) -> int:
    """An upper estimate of one training checkpoint's size: the adapter (`trainable_params` LoRA parameters of
    `adapter_bytes_per_param` bytes), AdamW's two moments per parameter (32-bit: 4 bytes each; 8-bit: 1 byte each
    plus one fp32 absmax per block, counted as 1/8 byte per element for blocks as small as 32), and
    CHECKPOINT_OVERHEAD_BYTES."""
    if state_bits not in (8, 32):
        raise ValueError(f"state_bits must be 8 or 32, got {state_bits}")
    moment_bytes = 4.0 if state_bits == 32 else 1.125
    return int(trainable_params * (adapter_bytes_per_param + 2 * moment_bytes)) + CHECKPOINT_OVERHEAD_BYTES


def run_output_bytes(trainable_params: int, adapter_bytes_per_param: int, state_bits: int,
                     keep_checkpoints: int) -> int:
    """What a run writes into its output folder at most: keep_checkpoints checkpoints plus the next one (a new
    checkpoint is written before the oldest is removed), and the final adapter."""
    adapter = trainable_params * adapter_bytes_per_param + CHECKPOINT_OVERHEAD_BYTES
    return (keep_checkpoints + 1) * checkpoint_bytes(trainable_params, adapter_bytes_per_param, state_bits) + adapter


def say_if_type_worse_than_nf4(model_dir: Path, quant_type: str, blocksize: int, model: str) -> None:
    """For a quant_type other than nf4: one warning line when it is measurably worse than NF4 on the model's weights
    (model/quant_type_check.py: a sample of about 2 M weights, about a second), an info line otherwise or when the
    weights cannot be compared (a pre-quantized folder). `model` is the name the user gave (for the advice)."""
    if quant_type == "nf4":
        return
    from ..model.quant_type_check import compare_with_nf4

    try:
        comparison = compare_with_nf4(model_dir, quant_type, blocksize)
    except QlorakitError as err:  # the loader reports what is wrong with the folder, if anything is
        log.info("qlorakit: quantization.quant_type %s not compared with nf4: %s", quant_type, err)
        return
    if comparison.worse():
        log.warning("qlorakit: warning: %s", comparison.warning(model))
    else:
        log.info("qlorakit: quantization.quant_type %s: mean relative error %.4f against nf4's %.4f on this model's "
                 "weights (sampled), within the margin", quant_type, comparison.error, comparison.nf4_error)
