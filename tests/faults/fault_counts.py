"""What the fault-injection suite injected, filled in by its tests and printed by conftest.py at the end."""

FAULT_COUNTS: dict[str, str] = {}
