#!/usr/bin/env python3
"""Host cost of one dispatched call, on the CPU: what `kernels.call(op, ...)` adds to calling the backend
function directly, and (where the checkout has custom ops, kernels/ops.py) what the custom-op path costs.

    PYTHONPATH=src python3 benchmarks/call_cost.py [--repeats 15] [--number 2000] [--out FILE.json]

Per operation (the reference backend, tiny CPU tensors, so the numbers are mostly Python and dispatcher time):
  direct      the backend function, looked up once, called with the backends' arguments;
  call        kernels.call(op, ...), the eager path;
  custom op   the op's wrapper (kernels/ops.WRAPPERS), i.e. torch.ops.qlorakit.<op> with the QuantState packed,
              the path torch.compile traces (absent on a checkout without custom ops).
and one whole fused LoRA function (nn/lora_blocks.lora_group_4bit: three NF4 projections 8 x 64 with rank-4
adapters on a 32 x 64 input, dropout 0.05, forward + backward), the host cost of a fused Q/K/V group's step, and
the dropout bookkeeping alone (dropout_step).
Each figure is the median (and the minimum) over `repeats` timed blocks of `number` calls, the blocks of the
paths interleaved so that load from other processes falls on all of them alike. Run it on an otherwise idle
machine for absolute numbers; on a shared one compare the columns of one run, or the minima of runs close in time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("QLORAKIT_KERNELS", "reference")
ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):  # PYTHONPATH=<other checkout>/src measures that checkout (main, say)
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from qlorakit import kernels  # noqa: E402
from qlorakit.kernels import dispatch  # noqa: E402


def cases() -> dict[str, tuple]:
    """Operation -> backend arguments: a 32 x 64 input through an 8 x 64 NF4 weight (double quantized), and a
    SwiGLU of 4 x 16."""
    gen = torch.Generator().manual_seed(0)
    packed, state = kernels.call("quantize_4bit", torch.randn(8, 64, generator=gen), 64, "nf4", True)
    return {"linear_4bit": (torch.randn(32, 64, generator=gen), packed, state, None),
            "swiglu": (torch.randn(4, 16, generator=gen),)}


def per_call_us(fn, args: tuple, number: int) -> float:
    t = time.perf_counter()
    for _ in range(number):
        fn(*args)
    return (time.perf_counter() - t) / number * 1e6


def group_step():
    """A fused Q/K/V-like LoRA group's forward + backward (dropout 0.05), as a function of no arguments."""
    from qlorakit.nn.lora_blocks import Projection, lora_group_4bit

    gen = torch.Generator().manual_seed(1)
    group = []
    for _ in range(3):
        packed, state = kernels.call("quantize_4bit", torch.randn(8, 64, generator=gen), 64, "nf4", True)
        group.append(Projection(packed, state, None, 2.0))
    adapters = [(torch.randn(4, 64, generator=gen).requires_grad_(), torch.randn(8, 4, generator=gen).requires_grad_())
                for _ in range(3)]
    x = torch.randn(32, 64, generator=gen).requires_grad_()

    def step():
        lora_group_4bit(x, tuple(group), adapters, 0.05, True).sum().backward()

    return step


def dropout_step():
    """The dropout bookkeeping of one fused group in eager execution: three draws in forward, their replay in
    backward, on a 4 x 8 tensor (what the fused functions do around their matmuls, as this checkout writes it)."""
    x = torch.randn(4, 8)
    try:
        from qlorakit.nn import dropout_draws
    except ImportError:  # a checkout where the functions draw and replay inline
        from qlorakit.nn.lora_fused import DropoutDraw

        def inline():
            draw = DropoutDraw(x.device)
            for _ in range(3):
                torch.native_dropout(x, 0.05, True)
            with draw.replay():
                for _ in range(3):
                    torch.native_dropout(x, 0.05, True)
        return inline

    def step():
        draws = dropout_draws.start(x.device, 0.05, True)
        for _ in range(3):
            draws.draw(x, x)
        back = dropout_draws.restore(dropout_draws.for_ctx(draws), dropout_draws.saved_states(draws))
        with back.replaying():
            for _ in range(3):
                back.redraw(x)
    return step


def measure(repeats: int, number: int) -> dict[str, dict[str, float]]:
    try:
        from qlorakit.kernels.ops import WRAPPERS
    except ImportError:  # a checkout without custom ops
        WRAPPERS = {}
    out = {}
    for op, args in cases().items():
        direct = dispatch.implementation(op, args[0].device)[1]
        paths = {"direct": direct, "call": lambda *a, _op=op: kernels.call(_op, *a)}
        if op in WRAPPERS:
            paths["custom op"] = WRAPPERS[op]
        with torch.no_grad():
            for fn in paths.values():  # warm-up (first-call registration work, caches)
                per_call_us(fn, args, max(1, number // 10))
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(repeats):
                for name, fn in paths.items():
                    times[name].append(per_call_us(fn, args, number))
        out[op] = {name: round(statistics.median(ts), 2) for name, ts in times.items()}
        out[op + " min"] = {name: round(min(ts), 2) for name, ts in times.items()}
    for name, step, n in (("lora_group_4bit fwd+bwd", group_step(), max(1, number // 10)),
                          ("dropout draws + replay", dropout_step(), number)):
        per_call_us(step, (), max(1, n // 5))
        times = [per_call_us(step, (), n) for _ in range(repeats)]
        out[name] = {"direct": round(statistics.median(times), 2)}
        out[name + " min"] = {"direct": round(min(times), 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--number", type=int, default=2000)
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.repeats, args.number)
    for op, paths in result.items():
        base = paths["direct"]
        print(f"{op:28s} " + "  ".join(f"{name} {us:8.2f} us (+{us - base:5.2f})" for name, us in paths.items()))
    if args.out:
        record = {"torch": torch.__version__, "src": str(Path(kernels.__file__).resolve().parents[1]),
                  "repeats": args.repeats, "number": args.number, "us_per_call": result}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
