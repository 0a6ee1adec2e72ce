"""What the GPU self-check benchmarks (kernels.py, optim.py) share: a recorder of PASS/FAIL checks and of targets
met or missed, printed as they come, and git metadata that never fails the run."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Run:
    def __init__(self) -> None:
        self.checks: list[dict] = []
        self.targets: list[dict] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "pass": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {name}{'  ' + detail if detail else ''}", flush=True)
        return ok

    def target(self, name: str, met: bool, detail: str) -> None:
        self.targets.append({"name": name, "met": bool(met), "detail": detail})
        print(f"{'MET ' if met else 'MISS'}  {name}  {detail}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.checks if not c["pass"]]


def sh(*cmd: str) -> str:
    """A command's stdout in the repository root, or 'unknown' (git missing, no repository)."""
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - metadata only
        return "unknown"
