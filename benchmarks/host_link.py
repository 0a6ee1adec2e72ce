"""What the host link sustains: pinned host <-> GPU copies alone, both directions at once, and beside a stream of
bf16 matmuls (the way activation offloading uses it), with the matmuls' own slowdown. It sizes how many bytes a
training step can move per millisecond of compute (training.offload_activations and the host optimizer).

    python3 benchmarks/host_link.py [--mib 72,288] [--out DIR]

Prints a short table; writes host_link.json under --out (default $OUT or benchmarks/results)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch


def _timed(fn, reps: int) -> float:
    """Milliseconds per call of fn over `reps` calls (after one warm-up), all work on the GPU finished."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def measure(mib: int, reps: int = 10) -> dict:
    n = mib * 2**20 // 2
    host_a = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    host_b = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    dev_a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dev_b = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    side, up = torch.cuda.Stream(), torch.cuda.Stream()
    gb = n * 2 / 1e9

    def d2h():
        host_a.copy_(dev_a, non_blocking=True)

    def h2d():
        dev_b.copy_(host_b, non_blocking=True)

    def both(beside=None):
        """A copy each way on its own stream, with `beside` (if given) on the compute stream meanwhile."""
        side.wait_stream(torch.cuda.current_stream())
        up.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            host_a.copy_(dev_a, non_blocking=True)
        with torch.cuda.stream(up):
            dev_b.copy_(host_b, non_blocking=True)
        if beside is not None:
            beside()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.current_stream().wait_stream(up)

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)

    def compute():
        for _ in range(4):
            a @ w

    t_d2h, t_h2d, t_both = _timed(d2h, reps), _timed(h2d, reps), _timed(both, reps)
    t_compute = _timed(compute, reps)

    t_over = _timed(lambda: both(compute), reps)
    return {"MiB": mib, "d2h_GBps": round(gb / t_d2h * 1e3, 2), "h2d_GBps": round(gb / t_h2d * 1e3, 2),
            "both_each_GBps": round(gb / t_both * 1e3, 2), "compute_ms": round(t_compute, 3),
            "copies_beside_compute_ms": round(t_over, 3),
            "copy_plus_compute_ms_if_serial": round(t_both + t_compute, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", default="72,288")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    rows = [measure(int(m)) for m in args.mib.split(",")]
    record = {"date": datetime.now(timezone.utc).isoformat(), "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_link.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'MiB':>5s} {'D2H GB/s':>9s} {'H2D GB/s':>9s} {'both, each':>11s} {'matmuls ms':>11s} "
          f"{'+ copies ms':>12s} {'serial ms':>10s}")
    for r in rows:
        print(f"{r['MiB']:5d} {r['d2h_GBps']:9.1f} {r['h2d_GBps']:9.1f} {r['both_each_GBps']:11.1f} "
              f"{r['compute_ms']:11.2f} {r['copies_beside_compute_ms']:12.2f} {r['copy_plus_compute_ms_if_serial']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
