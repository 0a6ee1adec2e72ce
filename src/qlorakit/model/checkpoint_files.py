"""Find and check the safetensors weight files of a local Hugging Face model folder, without reading tensor data.

A folder holds either `model.safetensors` (preferred, as transformers does when both exist) or shards named in
`model.safetensors.index.json` (`{"weight_map": {tensor name: file name}}`). Pickle-based weights (`*.bin`,
`*.pt`, ...) are never opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ..errors import CheckpointFormatError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class CheckpointFiles:
    """The weight files of a model folder.

    files: every safetensors file, in load order; keys: the tensor names each file holds (header order);
    sharded: whether they came from an index.
    """

    folder: Path
    keys: dict[Path, list[str]]
    sharded: bool

    @property
    def files(self) -> list[Path]:
        return list(self.keys)

    def key_to_file(self) -> dict[str, Path]:
        """Tensor name -> the file that holds it; CheckpointFormatError when two files hold the same name."""
        where: dict[str, Path] = {}
        for path, names in self.keys.items():
            for name in names:
                if name in where:
                    raise CheckpointFormatError(
                        f"{self.folder}: tensor {name!r} is in both {where[name].name} and {path.name}; "
                        "each tensor may be stored once"
                    )
                where[name] = path
        return where

    def num_tensors(self) -> int:
        return sum(len(names) for names in self.keys.values())


def require_model_folder(model_dir: str | Path) -> Path:
    """`model_dir` as a Path, after checking that it is a folder with a config.json."""
    folder = Path(model_dir)
    if not folder.exists():
        raise CheckpointFormatError(
            f"{folder}: no such folder; give a local Hugging Face model folder (config.json + *.safetensors)"
        )
    if not folder.is_dir():
        raise CheckpointFormatError(
            f"{folder}: is not a folder; give a local Hugging Face model folder (config.json + *.safetensors)"
        )
    if not (folder / "config.json").is_file():
        raise CheckpointFormatError(
            f"{folder}: no config.json; a Hugging Face model folder holds config.json next to its *.safetensors"
        )
    return folder


def find_checkpoint_files(model_dir: str | Path) -> CheckpointFiles:
    """The safetensors files of `model_dir` and the tensor names in each (headers only).

    Raises CheckpointFormatError (one line, naming the file or key) when there are no safetensors weights, the
    index is unreadable or names a file or tensor that is not there, or a file is not valid safetensors.
    """
    folder = require_model_folder(model_dir)
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file():
        return CheckpointFiles(folder, {single: _tensor_names(single)}, sharded=False)
    if index.is_file():
        return CheckpointFiles(folder, _files_from_index(folder, index), sharded=True)

    stray = sorted(p.name for p in folder.glob("*.safetensors"))
    if stray:
        raise CheckpointFormatError(
            f"{folder}: found {stray[0]} but no {SINGLE_FILE} or {INDEX_FILE}; allowed: one {SINGLE_FILE}, or "
            f"shards listed in {INDEX_FILE}"
        )
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = ""
    if pickles:
        found = (
            f" (found {pickles[0]}: pickle-based .bin/.pt weights are not loaded, for safety; "
            "convert them to safetensors)"
        )
    raise CheckpointFormatError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{found}")


def _files_from_index(folder: Path, index: Path) -> dict[Path, list[str]]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointFormatError(
            f"{index}: not a safetensors index ({err}); expected JSON with a \"weight_map\" of tensor name -> file"
        ) from None
    by_file: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(name)

    keys: dict[Path, list[str]] = {}
    for file_name in sorted(by_file):
        path = folder / file_name
        if Path(file_name).name != file_name or not path.is_file():
            raise CheckpointFormatError(
                f"{index}: names file {file_name!r} (for {by_file[file_name][0]!r}), which is not in {folder}"
            )
        held = _tensor_names(path)
        have = set(held)
        missing = [name for name in by_file[file_name] if name not in have]
        if missing:
            raise CheckpointFormatError(
                f"{path}: has no tensor {missing[0]!r}, which {INDEX_FILE} says it holds"
                + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
            )
        keys[path] = held
    return keys


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({first_line(err)})") from None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(err).strip().splitlines()
    return text[0].strip() if text else type(err).__name__
