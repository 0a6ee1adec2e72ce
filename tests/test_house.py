"""House rules that grep can check, so they stay true: no source file over 400 lines, and files and folders are
renamed into place only by the one atomic-write helper (atomic.py)."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qlorakit"
MAX_LINES = 400


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_only_atomic_py_renames_files_into_place():
    rename = re.compile(r"\bos\.(replace|rename)\(|\.rename\(|shutil\.move\(")
    found = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if p.name != "atomic.py"
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if rename.search(line)]
    assert found == []
