"""QLoRA training steps across the GPUs of one host, under torchrun, through qlorakit's own training path
(accumulate_gradients with the data-parallel context, FSDP2 sharding when --mode fsdp, paged AdamW 32-bit).

    torchrun --nproc-per-node N benchmarks/multi_gpu.py --shape llama3-8b --mode ddp --out DIR

A random-init model of the shape built directly in NF4 on every rank (synthetic_llama), LoRA r=64 alpha=16 on all
7 linears, dropout 0.05, gradient checkpointing, bf16 autocast. One optimizer step = `--micro` micro-batches of
BxT random tokens (the same global batch whatever N: each rank takes micro / N of them). Reports global
tokens/s (median step after warm-up) and each rank's peak memory (torch's counter), written by rank 0 to
DIR/multi_gpu-<shape>-<mode>-<N>gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--batch", default="4x2048", help="BxT of one micro-batch")
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per optimizer step (global)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()

    from qlorakit.model.lora_inject import enable_activation_checkpointing, inject_lora
    from qlorakit.model.synthetic import synthetic_llama
    from qlorakit.optim import build_optimizer
    from qlorakit.train.distributed import check_batch_split, init_distributed, shutdown
    from qlorakit.train.fsdp import grad_norm_value, integer_parameters_shardable, shard_model
    from qlorakit.train.loop import accumulate_gradients
    from qlorakit.train.runtime import Runtime

    ctx = init_distributed(mode=args.mode)
    check_batch_split(args.micro, ctx)
    device = torch.device("cuda", ctx.local_rank)
    torch.cuda.set_device(device)
    t0 = time.perf_counter()
    model = synthetic_llama(args.shape, device=device)
    build_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated(device) / 2**30
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=64, alpha=16, dropout=0.05, adapter_dtype=torch.float32)
    enable_activation_checkpointing(model)
    ctx.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    if ctx.sharded:
        shard_model(model, device, ctx.world_size)
    torch.cuda.empty_cache()
    held_gib = torch.cuda.memory_allocated(device) / 2**30
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer("paged_adamw_32bit", params, lr=2e-4, weight_decay=0.0)
    runtime = Runtime(device, torch.bfloat16, torch.float32)
    B, T = (int(v) for v in args.batch.split("x"))
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(1234)  # the same batches on every rank
    torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(args.steps):
        micro = []
        for _ in range(args.micro):
            ids = torch.randint(0, vocab, (B, T), device=device, generator=gen)
            micro.append({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
                          "position_ids": torch.arange(T, device=device).expand(B, T)})
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        loss = accumulate_gradients(model, micro, runtime, False, "sdpa", ctx)
        grad_norm_value(torch.nn.utils.clip_grad_norm_(params, 0.3))
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
        losses.append(loss)
        if ctx.is_main:
            print(f"step {step + 1}: {times[-1]:.3f} s, loss {loss:.4f}", flush=True)
    peaks = ctx.gather_objects(torch.cuda.max_memory_allocated(device) / 2**30)
    helds = ctx.gather_objects(held_gib)
    steady = sorted(times[2:])[len(times[2:]) // 2]
    tokens = args.micro * B * T
    rec = {"date": datetime.now(timezone.utc).isoformat(), "commit": os.environ.get("QLORAKIT_COMMIT", "?"),
           "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "shape": args.shape,
           "mode": args.mode, "world_size": ctx.world_size, "micro_batch": args.batch, "micro_batches": args.micro,
           "tokens_per_step": tokens, "step_s": round(steady, 4), "tokens_per_s": round(tokens / steady, 1),
           "build_s": round(build_s, 1), "weights_GiB_per_rank_before_sharding": round(weights_gib, 2),
           "model_GiB_per_rank_after_setup": [round(x, 2) for x in helds],
           "torch_peak_GiB_per_rank": [round(x, 2) for x in peaks], "losses": losses,
           "step_times": [round(x, 4) for x in times],
           "packed_4bit_sharded": bool(ctx.sharded and integer_parameters_shardable())}
    if ctx.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"multi_gpu-{args.shape}-{args.mode}-{ctx.world_size}gpu.json"
        (out / name).write_text(json.dumps(rec, indent=1) + "\n")
        print(json.dumps({k: rec[k] for k in ("shape", "mode", "world_size", "tokens_per_s", "step_s",
                                               "torch_peak_GiB_per_rank", "model_GiB_per_rank_after_setup")}),
              flush=True)
    shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
