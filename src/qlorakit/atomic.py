"""Writing files and folders whole or not at all: a reader sees the old contents or the new, never a part.

The one place qlorakit does this (checkpoints, adapters, merged and quantized models, the bundled assets, the
tokenisation cache, manifests, summaries):
  - `write_text(path, text)`, `write_bytes(path, data)`: a file, through a temporary name in the same folder and
    one rename;
  - `new_folder(target)`: a folder, written into a hidden sibling and swapped in when the block succeeds;
  - `swap_in(built, target)`: the swap itself, for callers that build the folder their own way. An existing
    target is set aside, the new folder renamed in, and the old one removed; if the second rename fails the old
    one is put back. Where several processes may build the same folder (the cache, the bundled model),
    `theirs_ok` says whether a target that appeared meanwhile is a complete twin to keep.
  - `folder_lock(folder, name)`: where several processes may build the same thing in a shared folder (the
    bundled model and data in the user cache), the second waits for the first instead of building it again.
Temporary and set-aside names are hidden (`.<name>.tmp-...`, `.<name>.old-...`) unless a caller names them, so
the cleanup of a killed run can find them by pattern.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str, *, tmp: str | Path | None = None, fsync: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` through `tmp` (default `.<name>.tmp` beside it) and a rename; `fsync`
    flushes the file to disk before the rename. The temporary file is removed if anything fails."""
    return _write(path, text, tmp, fsync)


def write_bytes(path: str | Path, data: bytes, *, tmp: str | Path | None = None, fsync: bool = False) -> Path:
    """write_text for bytes (a PNG, ...): the same temporary name, rename and cleanup."""
    return _write(path, data, tmp, fsync)


def _write(path: str | Path, data: str | bytes, tmp: str | Path | None, fsync: bool) -> Path:
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp")
    try:
        with (open(tmp, "wb") if isinstance(data, bytes) else open(tmp, "w", encoding="utf-8")) as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def swap_in(built: str | Path, target: str | Path, *, aside: str | Path | None = None,
            theirs_ok: Callable[[Path], bool] | None = None) -> Path:
    """Make the complete folder `built` appear at `target` (see the module docstring); `aside` names where an
    existing target waits while the new one is renamed in (default `.<name>.old-<pid>-<random>`). Returns target.
    """
    built, target = Path(built), Path(target)
    if not (target.exists() or target.is_symlink()):
        try:
            os.rename(built, target)
        except OSError:
            if theirs_ok is None or not theirs_ok(target):
                raise
            shutil.rmtree(built, ignore_errors=True)  # another process finished the same folder first
        fsync_dir(target.parent)
        return target
    old = Path(aside) if aside is not None else target.with_name(f".{target.name}.old-{_tag()}")
    os.replace(target, old)
    try:
        os.rename(built, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)
    return target


@contextmanager
def new_folder(target: str | Path, *, tmp: str | Path | None = None,
               theirs_ok: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """`with new_folder(target) as tmp:` write the folder's files into `tmp` (default `.<name>.tmp-<pid>-<random>`
    beside target, made with a plain mkdir so the umask applies); when the block succeeds tmp is swapped in for
    target (swap_in), and on any exception it is removed and target left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else target.with_name(f".{target.name}.tmp-{_tag()}")
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, target, theirs_ok=theirs_ok)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def folder_lock(folder: str | Path, name: str) -> Iterator[Path]:
    """Hold an exclusive advisory lock on `<folder>/.<name>.lock` for the block, waiting for another holder
    (process or thread) to finish first. The kernel drops the lock when its holder ends in any way, so a killed
    builder never leaves it held. Callers check again inside the block whether the work is already done."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)  # closing the descriptor drops the lock
