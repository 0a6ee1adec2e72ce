"""End to end on a GPU, as a user runs it: `qlorakit train` (YAML config, quantize-on-load, paged AdamW with the
default prefetch policy, bf16, checkpoints, sample replies decoded through the CUDA-graph decoder before and after)
and then `qlorakit generate` with the saved adapter, on a small random Llama built here (no hub access).

    python3 benchmarks/pipeline_gpu.py --out DIR

Writes DIR/pipeline-gpu.json: exit codes, eval losses, steps, seconds, whether any step fell back from the fast
paths (the log lines that say so), and the paged optimizer's prefetch counts.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from contextlib import redirect_stdout
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "pipeline"), str(ROOT / "tests")]

import torch  # noqa: E402


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU (to check this script itself)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("benchmarks/pipeline_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from pipeline_helpers import run_tree, save_tiny_model, write_pattern_data, write_yaml

    from qlorakit import cli

    work = Path("/tmp/qlorakit-pipeline-gpu")
    work.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny_model(work / "model", "llama", seed=0)
    data = write_pattern_data(work / "pattern.jsonl", n=200)
    tree = run_tree(model_dir, data, work / "run", training={
        "max_steps": args.steps, "batch_size": 4, "gradient_accumulation": 2, "learning_rate": 3e-3,
        "optimizer": "paged_adamw_32bit", "bf16": True, "gradient_checkpointing": True, "eval_every": 20,
        "save_every": 20, "resume": False})
    tree["quantization"]["compute_dtype"] = "bfloat16"
    tree["lora"].update(rank=64, alpha=128)  # adapters of >= 4096 values: their optimizer states are paged
    config = write_yaml(work / "run.yaml", tree)
    logs = Collect()
    logging.getLogger("qlorakit").addHandler(logs)
    logging.getLogger("qlorakit").setLevel(logging.INFO)

    t0 = time.perf_counter()
    buf = io.StringIO()
    with redirect_stdout(buf):
        train_rc = cli.main(["train", str(config), "--no-progress", "--prompt", "Say it 3.",
                             "--max-new-tokens", "24"])
    train_s = time.perf_counter() - t0
    train_out = buf.getvalue()
    buf = io.StringIO()
    t1 = time.perf_counter()
    with redirect_stdout(buf):
        gen_rc = cli.main(["generate", "--model", str(model_dir), "--adapter", str(work / "run" / "adapter"),
                           "--prompt", "Say it 7.", "--max-new-tokens", "24"])
    gen_s = time.perf_counter() - t1
    gen_out = buf.getvalue()

    events = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e["eval_loss"] for e in events if e.get("event") == "eval"]
    fallbacks = [line for line in logs.lines if "runs on the PyTorch reference" in line or "without CUDA graphs" in line
                 or "through transformers' generate" in line or "paged optimizer states need CUDA" in line]
    record = {
        "date": datetime.now(timezone.utc).isoformat(), "commit": os.environ.get("QLORAKIT_COMMIT", "?"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
        "train_exit": train_rc, "generate_exit": gen_rc, "train_seconds": round(train_s, 1),
        "generate_seconds": round(gen_s, 1), "eval_losses": evals, "steps": args.steps,
        "checkpoints": sorted(p.name for p in (work / "run" / "checkpoints").glob("step-*")),
        "fast_path_fallbacks": fallbacks,
        "train_stdout_tail": train_out[-1500:], "generate_stdout": gen_out[-800:],
        "log_tail": logs.lines[-25:],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline-gpu.json").write_text(json.dumps(record, indent=1) + "\n")
    print(train_out[-1500:])
    print(gen_out[-800:])
    print(f"train exit {train_rc} ({train_s:.0f} s), generate exit {gen_rc} ({gen_s:.0f} s); eval {evals}")
    print(f"fallbacks from fast paths: {fallbacks or 'none'}")
    ok = train_rc == 0 and gen_rc == 0 and len(evals) >= 2 and evals[-1] < evals[0] and not fallbacks
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
