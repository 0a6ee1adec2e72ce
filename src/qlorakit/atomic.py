"""Files written so that a reader sees the old contents or the new, never a part: a hidden temporary name in the
same folder, then one rename."""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through `.<name>.tmp` beside it and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
