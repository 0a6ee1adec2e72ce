"""A folder's manifest: the size and sha256 of every file in it, written last, checked before the folder is used.

A checkpoint is complete when its manifest.json exists (it is written after every other file, and the folder is
renamed into place only then); it is intact when every file the manifest lists has that size and hash. Flipped
bytes, a truncated or emptied file, an edited trainer_state.json or a file left out are each named.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..atomic import fsync_dir, write_text

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 22


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Hash every regular file directly in `folder` and write manifest.json (temporary name, fsync, rename)."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".tmp"):
            _fsync_file(p)
            files[p.name] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    write_text(folder / MANIFEST_NAME, json.dumps({"files": files}, indent=1, sort_keys=True) + "\n",
               tmp=folder / (MANIFEST_NAME + ".tmp"), fsync=True)
    fsync_dir(folder)
    return folder / MANIFEST_NAME


def verify_manifest(folder: Path) -> str | None:
    """None if `folder` matches its manifest, else what is wrong, e.g. 'optimizer.safetensors: contents differ
    from the manifest (damaged)'."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    except FileNotFoundError:
        return f"{MANIFEST_NAME} is missing (the write did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_NAME} is unreadable ({type(err).__name__})"
    for name, entry in sorted(listed.items()):
        p = folder / name
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return f"{name}: missing"
        if size != entry["bytes"]:
            return f"{name}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        if file_sha256(p) != entry["sha256"]:
            return f"{name}: contents differ from the manifest (damaged)"
    return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
