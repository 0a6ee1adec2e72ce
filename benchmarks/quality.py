"""Quality check on the default model and data: NF4 QLoRA against FP4 QLoRA and plain LoRA on a 16-bit base.

Same seed, data, schedule and adapter for all three; only the base weights' storage differs. Prints the eval
losses and ratios last and writes JSON (date, commit, machine, versions, every number) to --out.

    python benchmarks/quality.py --out benchmarks/results            # CPU: about 10-15 minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from qlorakit.config import load_config
from qlorakit.train.run import run_training

VARIANTS = {
    "nf4": ["quantization.load_in_4bit=true", "quantization.quant_type=nf4"],
    "fp4": ["quantization.load_in_4bit=true", "quantization.quant_type=fp4"],
    "16bit": ["quantization.load_in_4bit=false"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--workdir", default="runs/quality")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every variant, e.g. --set lora.rank=64")
    args = ap.parse_args()
    results = {}
    for name, sets in VARIANTS.items():
        overrides = sets + args.set + [f"training.output_dir={args.workdir}/{name}", f"training.max_steps={args.steps}",
                            f"training.eval_every={args.steps}", f"training.save_every={args.steps}",
                            "training.resume=false"]
        cfg = load_config(args.config, overrides)
        t0 = time.perf_counter()
        out = run_training(cfg, progress=False)
        hist = out.result.eval_history
        results[name] = {"eval_before": hist[0]["eval_loss"], "eval_after": hist[-1]["eval_loss"],
                         "train_loss_last": out.result.losses[-1], "seconds": time.perf_counter() - t0,
                         "eval_tokens": hist[-1]["eval_tokens"]}
        print(f"{name}: eval loss {hist[0]['eval_loss']:.4f} -> {hist[-1]['eval_loss']:.4f}", flush=True)
    nf4, fp4, b16 = (results[k]["eval_after"] for k in ("nf4", "fp4", "16bit"))
    verdict = {"nf4_vs_16bit_ratio": nf4 / b16, "nf4_within_2pct_of_16bit": nf4 <= 1.02 * b16,
               "nf4_le_fp4": nf4 <= fp4}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"date": datetime.now(timezone.utc).isoformat(), "commit": commit, "machine": platform.processor() or
              platform.machine(), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "config": args.config, "overrides": args.set, "steps": args.steps,
              "results": results,
              "verdict": verdict}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dest = Path(args.out) / f"quality-{record['device']}.json"
    dest.write_text(json.dumps(record, indent=2) + "\n")
    print("\nvariant  eval before  eval after")
    for k, r in results.items():
        print(f"{k:7s}  {r['eval_before']:.4f}       {r['eval_after']:.4f}")
    print(f"NF4 / 16-bit = {verdict['nf4_vs_16bit_ratio']:.4f} (target <= 1.02); NF4 <= FP4: {verdict['nf4_le_fp4']}")
    print(f"written {dest}")
    return 0 if verdict["nf4_within_2pct_of_16bit"] and verdict["nf4_le_fp4"] else 1


if __name__ == "__main__":
    sys.exit(main())
