"""What the CLI tests share: the one line a user error prints."""

from __future__ import annotations


def one_error_line(capsys) -> str:
    """The single `qlorakit: error: ...` line on stderr, with no traceback (asserted)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("qlorakit: error:")]
    assert len(lines) == 1, err
    return lines[0]
