"""GPU check of host_adamw_32bit (optim/in_backward.py): on a few decoder layers of the Llama-3-8B shape in NF4
with LoRA r=64 on all linears (dropout 0.05), the same random batches train once with fp32 adapters + qlorakit's
AdamW 32-bit stepped after backward and once with bf16 adapters + HostAdamW stepped inside backward on its side
stream (fp32 master copy and moments in pinned host memory). On the CPU the two are bit-identical
(tests/optim/test_in_backward.py); here the check reports, per step, whether the losses are equal, and at the end
the largest difference between the fp32 run's adapters and HostAdamW's master copies, so a race between the side
stream and the next forward would show. Also each run's step time and torch peak.

    python3 benchmarks/host_step_check.py [--out DIR] [--layers 4] [--batch 2x1024] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402


def run(optimizer: str, layers: int, b: int, t: int, steps: int) -> dict:
    from qlorakit.model.fused_blocks import enable_fused_blocks
    from qlorakit.model.lora_inject import enable_activation_checkpointing, inject_lora
    from qlorakit.model.synthetic import synthetic_llama
    from qlorakit.optim import build_optimizer
    from qlorakit.train.loop import forward_loss_sum
    from qlorakit.train.runtime import Runtime

    model = synthetic_llama("llama3-8b", layers=layers, device="cuda", seed=0)
    torch.manual_seed(1)
    inject_lora(model, "all-linear", r=64, alpha=16, dropout=0.05, adapter_dtype=torch.float32)
    with torch.no_grad():  # non-zero B, so every adapter's gradient is non-trivial from step 1
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 1e-3)
    enable_fused_blocks(model)
    enable_activation_checkpointing(model)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, [p for _, p in named], lr=1e-3, weight_decay=0.0)
    runtime = Runtime(torch.device("cuda"), torch.bfloat16, torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(2)
    torch.manual_seed(3)  # the dropout masks
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (b, t), device="cuda", generator=gen)
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
                 "position_ids": torch.arange(t, device="cuda").expand(b, t)}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward_loss_sum(model, batch, runtime, packing=False, attn_implementation="sdpa") / (b * (t - 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    final = {n: (opt.master(p) if hasattr(opt, "master") else p.detach().float().cpu()) for n, p in named}
    out = {"losses": losses, "step_s": sorted(times[1:])[len(times[1:]) // 2],
           "torch_peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 3),
           "adapter_dtype": str(named[0][1].dtype)}
    del model, opt, named
    torch.cuda.empty_cache()
    return out, final


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", default="2x1024")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    b, t = (int(v) for v in args.batch.split("x"))
    ref, ref_final = run("adamw_32bit", args.layers, b, t, args.steps)
    host, host_final = run("host_adamw_32bit", args.layers, b, t, args.steps)
    diff = max(float((ref_final[k] - host_final[k]).abs().max()) for k in ref_final)
    scale = max(float(v.abs().max()) for v in ref_final.values())
    same = [a == h for a, h in zip(ref["losses"], host["losses"])]
    record = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": args.layers,
              "batch": args.batch, "adamw_32bit": ref, "host_adamw_32bit": host, "losses_equal_per_step": same,
              "largest_adapter_difference": diff, "largest_adapter_value": scale}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "host_step_check.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'step':>4} {'adamw_32bit loss':>18} {'host_adamw_32bit':>18}")
    for i, (a, h) in enumerate(zip(ref["losses"], host["losses"])):
        print(f"{i + 1:4d} {a:18.9f} {h:18.9f} {'equal' if a == h else 'DIFFERENT'}")
    print(f"adapters: largest |fp32 run - host master| {diff:.3g} (largest value {scale:.3g}); step "
          f"{ref['step_s'] * 1e3:.1f} vs {host['step_s'] * 1e3:.1f} ms; torch peak {ref['torch_peak_GiB']} vs "
          f"{host['torch_peak_GiB']} GiB")
    print("PASS" if all(same) and diff == 0 else "CHECK: not bit-identical (see above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
