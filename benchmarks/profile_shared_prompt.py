"""Profile one DPO step with each pair's prompt run once (training.share_prompts) and twice (TRL's layout).

    python3 benchmarks/profile_shared_prompt.py [--layers 4] [--pairs 1] [--seq 1024] [--prompt 768] [--out DIR]

A random-init Llama-3-8B shape cut to --layers layers, NF4, LoRA r=64 on all linears (bf16 adapters), the fused
block paths, every layer recomputed, bf16 autocast; the step of train/preference_step.py (reference forward
without gradients, policy forward, backward), no optimizer. Per layout: the median step time over 6 steps, then
one profiled step: its CUDA kernels by total time and the CPU ops by self time, top 15 each, and how many kernels
it launched. JSON: OUT/profile_shared_prompt.json. A diagnosis, not a comparison with anyone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_step import pair_batch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=768)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_shared_prompt.py: needs a CUDA GPU")
        return 1
    import dpo_step
    from qlorakit.model.fused_blocks import enable_fused_blocks
    from qlorakit.model.lora_inject import enable_activation_checkpointing, inject_lora
    from qlorakit.model.synthetic import synthetic_llama
    from qlorakit.train.preference import PreferenceSettings
    from qlorakit.train.preference_step import micro_batch_loss
    from qlorakit.train.runtime import Runtime

    dpo_step.DEV = "cuda"
    model = synthetic_llama("llama3-8b", layers=args.layers, device="cuda")
    inject_lora(model, "all-linear", r=64, alpha=16, dropout=0.0, adapter_dtype=torch.bfloat16)
    print(enable_fused_blocks(model).line())
    enable_activation_checkpointing(model)
    model.train()
    runtime = Runtime(torch.device("cuda"), torch.bfloat16, torch.bfloat16)
    batch = pair_batch(args.pairs, args.seq, args.prompt, model.config.vocab_size)
    record: dict = {"args": vars(args), "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for shared in (True, False):
        settings = PreferenceSettings("dpo", share_prompts=shared)

        def step() -> None:
            loss, _ = micro_batch_loss(model, batch, runtime, settings)
            loss.backward()
            model.zero_grad(set_to_none=True)

        times = []
        for _ in range(8):
            torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu = sorted((e for e in events if e.device_time_total > 0), key=lambda e: -e.device_time_total)
        cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)
        name = "shared" if shared else "two rows"
        record[name] = {
            "step_ms": round(sorted(times[2:])[len(times[2:]) // 2] * 1e3, 2),
            "kernels": sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx",
                                                               "cudaLaunchKernelExC")),
            "gpu_top": [{"name": e.key[:90], "ms": round(e.device_time_total / 1e3, 3), "count": e.count}
                        for e in gpu[:15]],
            "cpu_self_top": [{"name": e.key[:90], "ms": round(e.self_cpu_time_total / 1e3, 3), "count": e.count}
                             for e in cpu[:15]]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_shared_prompt.json").write_text(json.dumps(record, indent=1) + "\n")
    for name in ("shared", "two rows"):
        r = record[name]
        print(f"== {name}: step {r['step_ms']} ms, {r['kernels']} launches")
        for e in r["gpu_top"][:12]:
            print(f"   gpu {e['ms']:8.3f} ms x{e['count']:<5d} {e['name']}")
        for e in r["cpu_self_top"][:8]:
            print(f"   cpu {e['ms']:8.3f} ms x{e['count']:<5d} {e['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
