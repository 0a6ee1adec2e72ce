"""Local data files (JSON, JSONL, Parquet, CSV) read with `datasets` into a list of records."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataFormatError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def resolve_data_path(path: str) -> Path:
    """A data path as the config and commands take it: a file, or 'default:NAME' for a bundled set."""
    if path.startswith("default:"):
        from ..assets import default_data

        return default_data(path.split(":", 1)[1])
    return Path(path).expanduser()


def check_data_file(path: str | Path) -> Path:
    """The path, if it names an existing file of a supported kind; DataFormatError otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataFormatError(f"{p}: data file not found")
    if not p.is_file():
        raise DataFormatError(f"{p}: is not a file; give a .json, .jsonl, .parquet or .csv file")
    if p.suffix.lower() not in BUILDERS:
        raise DataFormatError(f"{p}: unsupported data file extension {p.suffix or '(none)'!r}; "
                              f"use one of {', '.join(BUILDERS)}")
    return p


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _innermost_message(err: BaseException) -> str:
    # datasets wraps parser errors in a generic "An error occurred while generating the dataset".
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a local .json (a list of objects), .jsonl, .parquet or .csv file, in file order.

    CSV cells are read as strings, empty cells as "". In JSON, a key some records lack reads as None in those.
    Raises DataFormatError naming the file when it is missing, of another kind, empty or unreadable.
    """
    p = check_data_file(path)
    if p.stat().st_size == 0:
        raise DataFormatError(f"{p}: the file is empty")
    builder = BUILDERS[p.suffix.lower()]
    import datasets  # slow to import, and a cache hit never needs it

    with tempfile.TemporaryDirectory(prefix="qlorakit-read-") as scratch, _quiet_datasets():
        try:
            options = _csv_options(p, datasets) if builder == "csv" else {}
            table = datasets.load_dataset(builder, data_files=str(p.resolve()), split="train", cache_dir=scratch,
                                          keep_in_memory=True, **options)
            return table.to_list()
        except Exception as err:  # noqa: BLE001 - any parser failure becomes one line naming the file
            reason = _innermost_message(err)
            if "corresponds to no data" in reason:  # datasets' words for a file that parsed to zero rows
                raise DataFormatError(f"{p}: the file holds no records") from None
            raise DataFormatError(f"{p}: cannot be read as {builder.upper()}: {reason}") from None


def _csv_options(p: Path, datasets: Any) -> dict[str, Any]:
    # Every column a string column, so "42" stays "42" rather than becoming an int, and empty cells stay "".
    with open(p, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return {"na_filter": False, "features": datasets.Features({name: datasets.Value("string") for name in header})}
