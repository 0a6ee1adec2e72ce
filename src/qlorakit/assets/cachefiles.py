"""Where the cache is, and how files get into it: temporary folders next to their final place (and the cleanup
of those a killed build left), and atomic writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..atomic import folder_lock, write_text
from ..errors import AssetError


def cache_dir() -> Path:
    """$QLORAKIT_CACHE, else $XDG_CACHE_HOME/qlorakit, else ~/.cache/qlorakit (not created here)."""
    if os.environ.get("QLORAKIT_CACHE"):
        return Path(os.environ["QLORAKIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "qlorakit"
    return Path.home() / ".cache" / "qlorakit"


# ----------------------------------------------------------------------------------------------------------------
# Cache bookkeeping.


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(parent: Path, stem: str) -> None:
    """Temporary folders/files `.tmp-<stem>-<pid>-*` left by a build that was killed."""
    if not parent.is_dir():
        return
    for path in parent.glob(f".tmp-{stem}-*"):
        try:
            pid = int(path.name[len(f".tmp-{stem}-") :].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _temp_dir(parent: Path, stem: str) -> Path:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(parent, stem)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{stem}-{os.getpid()}-", dir=parent))
    except OSError as err:
        raise AssetError(
            f"cannot write to the qlorakit cache at {parent} ({err.strerror or err}): set QLORAKIT_CACHE to a "
            "writable folder"
        ) from None


@contextlib.contextmanager
def _building(parent: Path, stem: str) -> Iterator[None]:
    """Hold the cache's lock for building `stem` in `parent`: a second process wanting the same asset waits for
    the first, then finds it ready, instead of downloading and converting it again."""
    try:
        lock = folder_lock(parent, stem)
        lock.__enter__()
    except OSError as err:
        raise AssetError(
            f"cannot write to the qlorakit cache at {parent} ({err.strerror or err}): set QLORAKIT_CACHE to a "
            "writable folder"
        ) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _write_atomic(path: Path, text: str) -> None:
    write_text(path, text, tmp=path.with_name(f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}"))
