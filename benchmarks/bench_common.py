"""What the GPU benchmarks share: a recorder of PASS/FAIL checks and of targets met or missed, printed as they
come, git metadata that never fails the run, and a sampler of the device-wide (NVML) memory peak."""

from __future__ import annotations

import subprocess
import threading
import time
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


class NvmlPeak:
    """`with NvmlPeak() as nv: ...` then nv.peak: the largest device-wide used memory (bytes, what nvidia-smi
    shows) sampled every `every` seconds on the current CUDA device (or the NVML handle given)."""

    def __init__(self, handle=None, every: float = 0.005):
        self.handle, self.every, self.peak, self._stop = handle, every, 0, False

    def __enter__(self):
        import pynvml
        import torch

        pynvml.nvmlInit()
        if self.handle is None:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

        def run():
            while not self._stop:
                self.peak = max(self.peak, pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
                time.sleep(self.every)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
