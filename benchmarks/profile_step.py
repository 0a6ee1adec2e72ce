"""Profile qlorakit QLoRA steps (torch.profiler): where one step's GPU time goes, by kind of kernel.

    python3 benchmarks/profile_step.py [--layers 8] [--batch 4x2048] [--optimizer paged_adamw_32bit]
                                       [--variants default,cudnn] [--out DIR]

For each variant: the median step time over a few steps, then one profiled step whose CUDA kernels are summed
by kind (GEMM, attention, 4-bit dequantize, other Triton, elementwise/other), and the peak memory. Variants:
`default` (the training path as configured), `cudnn` / `flash` (SDPA restricted to that backend), `nockpt` (no activation checkpointing), `fused` (the fused
block paths, model/fused_blocks.py), `fused-keep` (fused, with --keep-gib of activations kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

KINDS = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("dequantize", ("_dequantize_kernel",)),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas", "splitk")),
    ("triton", ("triton", "_kernel")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "elementwise/other"


def sdpa_context(variant: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if variant == "cudnn":
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    if variant == "flash":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return contextlib.nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", default="4x2048")
    ap.add_argument("--optimizer", default="paged_adamw_32bit")
    ap.add_argument("--variants", default="default,cudnn")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--keep-gib", type=float, default=8.0)
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    args = ap.parse_args()
    from qlorakit.model.fused_blocks import disable_fused_blocks, enable_fused_blocks, keep_activations
    from qlorakit.model.lora_inject import enable_activation_checkpointing, inject_lora
    from qlorakit.model.synthetic import synthetic_llama
    from qlorakit.optim import build_optimizer
    from qlorakit.train.loop import forward_loss_sum
    from qlorakit.train.runtime import Runtime

    model = synthetic_llama("llama3-8b", layers=args.layers, device="cuda")
    inject_lora(model, "all-linear", r=64, alpha=16, dropout=0.05)
    enable_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(args.optimizer, params, lr=2e-4, weight_decay=0.0)
    rt = Runtime(torch.device("cuda"), torch.bfloat16, torch.float32)
    B, T = (int(v) for v in args.batch.split("x"))
    model.train()

    layers = model.model.layers

    def configure(variant: str):
        disable_fused_blocks(model)
        for layer in layers:  # `nockpt`: no layer is recomputed in backward (all activations kept)
            layer.gradient_checkpointing = variant != "nockpt"
        if variant.startswith("fused"):
            enable_fused_blocks(model)
            keep_activations(model, B * T, int(args.keep_gib * 2**30) if variant == "fused-keep" else 0)

    def step(variant: str):
        ids = torch.randint(0, model.config.vocab_size, (B, T), device="cuda")
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
                 "position_ids": torch.arange(T, device="cuda").expand(B, T)}
        with sdpa_context(variant):
            loss = forward_loss_sum(model, batch, rt, packing=False, attn_implementation="sdpa") / (B * T)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    report = {"layers": args.layers, "batch": args.batch, "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "variants": {}}
    for variant in args.variants.split(","):
        configure(variant)
        torch.cuda.empty_cache()
        for _ in range(2):
            step(variant)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step(variant)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            step(variant)
            torch.cuda.synchronize()
        by_kind: dict[str, float] = {}
        top: list[tuple[str, float, int]] = []
        cpu_top = sorted(((ev.key[:90], ev.self_cpu_time_total / 1e3, ev.count) for ev in prof.key_averages()
                          if ev.self_cpu_time_total > 0), key=lambda r: -r[1])
        for ev in prof.key_averages():
            cuda_us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
            if cuda_us <= 0 or ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            by_kind[kind_of(ev.key)] = by_kind.get(kind_of(ev.key), 0.0) + cuda_us / 1e3
            top.append((ev.key[:90], cuda_us / 1e3, ev.count))
        top.sort(key=lambda r: -r[1])
        med = sorted(times)[len(times) // 2]
        report["variants"][variant] = {
            "step_s": round(med, 4), "tok_per_s": round(B * T / med, 1),
            "torch_peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "gpu_ms_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n, "ms": round(ms, 2), "count": c} for n, ms, c in top[:30]],
            "gpu_busy_ms": round(sum(by_kind.values()), 2),
            "top_cpu_ops_self_ms": [{"name": n, "ms": round(ms, 2), "count": c} for n, ms, c in cpu_top[:30]],
        }
        print(f"\n== {variant}: step {med * 1e3:.1f} ms, {B * T / med:.0f} tok/s, peak "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        for n, ms, c in top[:25]:
            print(f"  {ms:9.2f} ms {c:6d}x  {n}")
        print(f"  GPU busy {sum(by_kind.values()):.1f} ms of the step; host side, self CPU time (profiled):")
        for n, ms, c in cpu_top[:15]:
            print(f"  {ms:9.2f} ms {c:6d}x  {n}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_step.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nllama3-8b shape, {args.layers} layers, batch {args.batch}: GPU ms per step by kind")
    for variant, r in report["variants"].items():
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in r["gpu_ms_by_kind"].items())
        print(f"{variant:8s} step {r['step_s'] * 1e3:7.1f} ms  GPU busy {r['gpu_busy_ms']:7.1f} ms  "
              f"peak {r['torch_peak_GiB']:5.2f} GiB | {kinds}")


if __name__ == "__main__":
    main()
