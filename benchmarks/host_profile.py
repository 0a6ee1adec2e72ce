"""Where the host's time goes in a training step on the GPU: Python functions by own time (cProfile).

    python3 benchmarks/host_profile.py [--layers 8] [--objective dpo|sft] [--pairs 1] [--seq 1024] [--out DIR]

At one pair (or one 2 x seq-token SFT batch) a step of the 8B shape is bound by the host: the GPU waits for
kernels the Python side has not launched yet (README, "Measured"). This runs the step of
train/preference_step.py (dpo: reference forward, policy forward, backward) or of the SFT loss on a random-init
Llama-3-8B shape cut to --layers layers (NF4, r=64 bf16 adapters on all linears, fused blocks, every layer
recomputed, bf16 autocast, no optimizer), 4 warm-up steps, then 5 steps under cProfile: the step time with and
without the profiler, and the 30 functions with the most own time (per step), Triton's launcher and torch's
Python included. JSON: OUT/host_profile-<objective>.json. A diagnosis; nothing is compared.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--objective", default="dpo", choices=("dpo", "sft"))
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("host_profile.py: needs a CUDA GPU")
        return 1
    import dpo_step
    from qlorakit.model.fused_blocks import enable_fused_blocks
    from qlorakit.model.lora_inject import enable_activation_checkpointing, inject_lora
    from qlorakit.model.synthetic import synthetic_llama
    from qlorakit.train.loop import forward_loss_sum
    from qlorakit.train.preference import PreferenceSettings
    from qlorakit.train.preference_step import micro_batch_loss
    from qlorakit.train.runtime import Runtime

    model = synthetic_llama("llama3-8b", layers=args.layers, device="cuda")
    inject_lora(model, "all-linear", r=64, alpha=16, dropout=0.0, adapter_dtype=torch.bfloat16)
    fused = enable_fused_blocks(model)
    enable_activation_checkpointing(model)
    model.train()
    runtime = Runtime(torch.device("cuda"), torch.bfloat16, torch.bfloat16)
    vocab = model.config.vocab_size
    dpo_step.DEV = "cuda"
    pairs_batch = dpo_step.pair_batch(args.pairs, args.seq, 256, vocab)
    ids = torch.randint(0, vocab, (2 * args.pairs, args.seq), device="cuda")
    sft_batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
                 "position_ids": torch.arange(args.seq, device="cuda").expand_as(ids)}

    def step() -> None:
        if args.objective == "dpo":
            loss, _ = micro_batch_loss(model, pairs_batch, runtime, PreferenceSettings("dpo"))
        else:
            loss = forward_loss_sum(model, sft_batch, runtime, packing=False,
                                    attn_implementation="sdpa") / ids.numel()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    for _ in range(4):
        step()
    plain = timed(5)
    prof = cProfile.Profile()
    prof.enable()
    profiled = timed(5)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, fn), (_, calls, own, total, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(path).name}:{line}({fn})" if path != "~" else fn,
                     "where": path, "calls_per_step": calls / 5, "own_ms_per_step": own / 5 * 1e3,
                     "total_ms_per_step": total / 5 * 1e3})
    rows.sort(key=lambda r: -r["own_ms_per_step"])
    record = {"args": vars(args), "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "fused": fused.line() if fused else None, "step_ms": round(plain * 1e3, 2),
              "step_ms_profiled": round(profiled * 1e3, 2), "top_own_time": rows[:30]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"host_profile-{args.objective}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.objective}, {args.layers} layers: step {record['step_ms']} ms, under cProfile "
          f"{record['step_ms_profiled']} ms; own time per step:")
    for r in rows[:22]:
        print(f"  {r['own_ms_per_step']:7.2f} ms  x{r['calls_per_step']:<6g} {r['function'][:95]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
