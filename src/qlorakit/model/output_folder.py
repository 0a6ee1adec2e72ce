"""The output folders of `qlorakit merge` and `qlorakit quantize`: what they carry over from the source, and how
they are written without ever deleting what the command did not create.

An output is written into a temporary sibling folder and, once complete, gets MARKER_NAME (a JSON record of the
command, the qlorakit version and the files it wrote) and is renamed into place. An existing folder is replaced
only with `overwrite`, and only when it is empty or holds nothing but a previous output of the same command
(its marker and the files the marker lists); then the old folder is renamed aside, the new one renamed in, and
the old one removed. A folder that is, holds or lies inside one of the command's inputs (the base model, the
adapter) or a training run folder (one holding any of RUN_FILES) is never replaced.

Custom code (top-level *.py files such as modeling_*.py, and the `auto_map` entries of config.json and the
other JSON files that point at it) is carried over only when the caller asks for it; otherwise it is left out
and the log says so once.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from ..atomic import swap_in
from ..errors import OutputFolderError
from .checkpoint_files import PICKLE_SUFFIXES

log = logging.getLogger("qlorakit.model")

MARKER_NAME = "qlorakit_output.json"
RUN_FILES = ("checkpoints", "trainer_state.json", "metrics.jsonl", "adapter_config.json")
# Not carried over as side files: weights (rewritten by the command, or pickle-based and never read).
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", *PICKLE_SUFFIXES)


def check_out_dir(out: Path, command: str, overwrite: bool, inputs: Mapping[str, Path]) -> None:
    """Refuse (OutputFolderError, one line) an output folder that the command may not write or replace.

    inputs: what each input folder is ("base model", "adapter", ...) -> its path. Refused: `out` equal to,
    inside or holding an input; an existing `out` that is not a plain folder, lies in (or is) a training run
    folder, or holds anything but a previous output of `command`; and any existing `out` without `overwrite`.
    """
    where = out.resolve()
    for what, folder in inputs.items():
        held = Path(folder).resolve()
        if where == held or held in where.parents:
            raise OutputFolderError(f"{out}: the output folder may not be the {what} folder or inside it "
                                    f"({folder}); give a new folder")
        if where in held.parents:
            raise OutputFolderError(f"{out}: holds the {what} folder ({folder}); give a new folder for the output")
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputFolderError(f"{out}: exists and is not a plain folder; give a new folder name")
    why = _why_not_replaceable(out, where, command)
    if why:
        raise OutputFolderError(f"{out}: {why}; --overwrite replaces only an empty folder or a previous "
                                f"`qlorakit {command}` output: give a new folder name")
    if not overwrite:
        raise OutputFolderError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")


def _why_not_replaceable(out: Path, where: Path, command: str) -> str | None:
    for folder in (where, *where.parents):
        found = next((name for name in RUN_FILES if (folder / name).exists()), None)
        if found:
            run = "is a training run folder" if folder == where else f"is inside the training run folder {folder}"
            return f"{run} (it holds {found})"
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return None
    if MARKER_NAME not in entries:
        return f"holds files that qlorakit did not write (e.g. {entries[0]!r}; there is no {MARKER_NAME})"
    try:
        record = json.loads((out / MARKER_NAME).read_text(encoding="utf-8"))
        written, made_by = set(record["files"]), record["command"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return f"its {MARKER_NAME} is not a readable qlorakit record"
    if made_by != command:
        return f"holds a `qlorakit {made_by}` output, not a `qlorakit {command}` one"
    for name in entries:
        path = out / name
        if name != MARKER_NAME and (name not in written or path.is_symlink() or not path.is_file()):
            return f"holds {name!r}, which `qlorakit {command}` did not write there"
    return None


def new_partial(out: Path) -> Path:
    """A new, empty temporary folder next to `out` (same file system, so the final rename is atomic)."""
    out = out.resolve()  # `out` may be given as "." or end in ".."
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    return partial


def commit(partial: Path, out: Path, command: str, overwrite: bool, inputs: Mapping[str, Path]) -> None:
    """Mark the complete `partial` folder as `command`'s output and swap it in for `out` (see the module doc).

    The checks of check_out_dir run again first: `out` may have changed while the output was being written.
    """
    files = sorted(p.name for p in partial.iterdir())
    record = {"command": command, "qlorakit_version": _version(), "files": files}
    (partial / MARKER_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    check_out_dir(out, command, overwrite, inputs)
    swap_in(partial, out.resolve())  # the old output waits as .<name>.old-*, put back if the rename fails


def drop_auto_map(config: dict, keep_code: bool, name: str = "config.json") -> list[str]:
    """Remove `auto_map` (which points at custom code) from a JSON object unless keep_code; returns what went."""
    if keep_code or "auto_map" not in config:
        return []
    del config["auto_map"]
    return [f"{name}'s auto_map"]


def copy_side_files(src: Path, dst: Path, keep_code: bool) -> list[str]:
    """Copy the top-level files other than weights, config.json and qlorakit's marker (tokenizer, generation
    config, chat template, licence) from `src` to `dst`. Without keep_code, *.py files are left out and `auto_map`
    is dropped from JSON files. Returns what was left out."""
    left: list[str] = []
    for path in sorted(src.iterdir()):
        name = path.name
        if (
            not path.is_file()
            or name.startswith(".")
            or name in ("config.json", MARKER_NAME)
            or name.endswith(_WEIGHT_SUFFIXES)
            or name.endswith(".index.json")
        ):
            continue
        if name.endswith(".py") and not keep_code:
            left.append(name)
            continue
        if name.endswith(".json") and not keep_code:
            data = _json_object(path)
            if data is not None and "auto_map" in data:
                left += drop_auto_map(data, keep_code, name)
                (dst / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                continue
        shutil.copy2(path, dst / name)
    return left


def say_left_out(out: Path, left: list[str]) -> None:
    """Log once what custom code an output left out, and why."""
    if left:
        log.warning("qlorakit: left out of %s: %s; custom code is carried over only with --trust-remote-code "
                    "(trust_remote_code=True), and the output loads with transformers' built-in classes",
                    out, ", ".join(left))


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qlorakit")
    except PackageNotFoundError:
        return "unknown"
