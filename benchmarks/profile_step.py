"""Profile a few qlorakit QLoRA steps (torch.profiler): where the time of one step goes, top ops printed.

    python3 benchmarks/profile_step.py [--layers 32] [--batch 1x2048] [--optimizer paged_adamw_32bit]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", default="1x2048")
    ap.add_argument("--optimizer", default="paged_adamw_32bit")
    args = ap.parse_args()
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

    def step():
        ids = torch.randint(0, model.config.vocab_size, (B, T), device="cuda")
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
                 "position_ids": torch.arange(T, device="cuda").expand(B, T)}
        (forward_loss_sum(model, batch, rt, packing=False, attn_implementation="sdpa") / (B * T)).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
