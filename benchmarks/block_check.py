"""GPU self-check of the fused Llama block paths: the Triton RMSNorm / SwiGLU / cross-entropy kernels against
their references on the GPU, and a small NF4 Llama trained one step through the fused blocks against the same
model through transformers' modules (same seed, so the same LoRA dropout masks), in bf16 autocast.

    python3 benchmarks/block_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import Run, sh  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ulps(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(elements that differ, the largest difference in bf16 ulps of the larger magnitude) of two bf16 tensors."""
    a, b = a.float(), b.float()
    differ = a != b
    if not differ.any():
        return 0, 0
    ulp = torch.maximum(a.abs(), b.abs())[differ].clamp_min(1e-30).log2().floor().exp2() * 2 ** -7
    return int(differ.sum()), int(((a - b).abs()[differ] / ulp).max().round())


def kernel_checks(run: Run) -> None:
    from qlorakit.kernels import reference as ref
    from qlorakit.kernels import triton_block, triton_loss, triton_rope

    dev = "cuda"
    for rows, h in ((8192, 4096), (3, 1000)):
        x = torch.randn(rows, h, device=dev, dtype=torch.bfloat16) * 3
        w = torch.randn(h, device=dev, dtype=torch.bfloat16)
        y, r = triton_block.rms_norm_triton(x, w, 1e-5)
        y_ref, r_ref = ref.rms_norm_ref(x, w, 1e-5)
        run.check(f"rms_norm fwd {rows}x{h}", rel(y, y_ref) < 4e-3 and rel(r, r_ref) < 1e-6,
                  f"rel {rel(y, y_ref):.2e}, rstd rel {rel(r, r_ref):.2e}")
        dy = torch.randn_like(x)
        dx, dx_ref = triton_block.rms_norm_backward_triton(dy, x, w, r_ref), ref.rms_norm_backward_ref(dy, x, w, r_ref)
        run.check(f"rms_norm bwd {rows}x{h}", rel(dx, dx_ref) < 4e-3, f"rel {rel(dx, dx_ref):.2e}")
    for rows, inter in ((8192, 14336), (5, 1500)):
        gu = torch.randn(rows, 2 * inter, device=dev, dtype=torch.bfloat16) * 3
        a, a_ref = triton_block.swiglu_triton(gu), ref.swiglu_ref(gu)
        run.check(f"swiglu fwd {rows}x{inter}", rel(a, a_ref) < 4e-3, f"rel {rel(a, a_ref):.2e}")
        da = torch.randn(rows, inter, device=dev, dtype=torch.bfloat16)
        d, d_ref = triton_block.swiglu_backward_triton(da, gu), ref.swiglu_backward_ref(da, gu)
        run.check(f"swiglu bwd {rows}x{inter}", rel(d, d_ref) < 4e-3, f"rel {rel(d, d_ref):.2e}")
    for b, s, heads, kv, d in ((4, 2048, 32, 8, 128), (1, 3, 6, 2, 64)):
        qkv = torch.randn(b, s, (heads + 2 * kv) * d, device=dev, dtype=torch.bfloat16)
        ang = torch.rand(b, s, d // 2, device=dev) * 100
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
        outs, outs_ref = (triton_rope.qkv_rope_triton(qkv, cos, sin, heads, kv, d),
                          ref.qkv_rope_ref(qkv, cos, sin, heads, kv, d))
        # bit-identical, or how many elements differ and by how many bf16 ulps (of the larger magnitude)
        diffs = [ulps(a, r) for a, r in zip(outs, outs_ref)]
        grads = [torch.randn_like(o) for o in outs]
        dg, dg_ref = triton_rope.qkv_rope_backward_triton(*grads, cos, sin), ref.qkv_rope_backward_ref(*grads, cos, sin)
        diffs.append(ulps(dg, dg_ref))
        run.check(f"qkv_rope fwd/bwd {b}x{s} heads {heads}/{kv}", all(worst <= 1 for _, worst in diffs),
                  "q, k, v, d_qkv: " + ", ".join(f"{n} differ (max {w} ulp)" for n, w in diffs))
    for rows, vocab in ((4096, 128256), (3, 1000)):
        logits = torch.randn(rows, vocab, device=dev, dtype=torch.bfloat16) * 4
        t = torch.randint(0, vocab, (rows,), device=dev)
        a, b = logits.clone(), logits.clone()
        loss, loss_ref = triton_loss.cross_entropy_grad_triton(a, t), ref.cross_entropy_grad_ref(b, t)
        run.check(f"cross_entropy_grad {rows}x{vocab}", rel(loss, loss_ref) < 1e-6 and rel(a, b) < 4e-3,
                  f"loss rel {rel(loss, loss_ref):.2e}, grad rel {rel(a, b):.2e}")


def model_check(run: Run) -> dict:
    from qlorakit.model.fused_blocks import disable_fused_blocks, enable_fused_blocks, keep_activations
    from qlorakit.model.lora_inject import enable_activation_checkpointing, inject_lora
    from qlorakit.model.synthetic import synthetic_llama
    from qlorakit.train.loss import decoder_loss_sum

    shape = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
    model = synthetic_llama(shape, device="cuda")
    inject_lora(model, "all-linear", r=16, alpha=16, dropout=0.05)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    enable_activation_checkpointing(model)
    model.train()
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = decoder_loss_sum(model, inputs, ids) / ids.numel()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, g_ref = step()
    report = enable_fused_blocks(model)
    loss_f, g_f = step()
    keep_activations(model, ids.numel(), 10 * 2**30)
    loss_k, g_k = step()
    disable_fused_blocks(model)
    worst = max(rel(g_f[n], g_ref[n]) for n in g_ref)
    worst_k = max(rel(g_k[n], g_f[n]) for n in g_f)
    run.check("fused model: loss == transformers' modules", abs(float(loss_f - loss_ref)) < 2e-3 * abs(float(loss_ref)),
              f"{float(loss_f):.5f} vs {float(loss_ref):.5f}")
    run.check("fused model: LoRA gradients", worst < 3e-2, f"worst rel {worst:.2e} over {len(g_ref)} tensors")
    run.check("fused model, activations kept: gradients == recomputed", worst_k < 1e-6 and float(loss_k) == float(loss_f),
              f"worst rel {worst_k:.2e}")
    return {"fused": report.line(), "loss_ref": float(loss_ref), "loss_fused": float(loss_f), "worst_grad_rel": worst}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    run = Run()
    kernel_checks(run)
    detail = model_check(run)
    record = {"commit": sh("git", "rev-parse", "--short", "HEAD"), "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "checks": run.checks, "model": detail}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "block_check.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"block_check: {len(run.checks) - len(run.failed)}/{len(run.checks)} PASS; failed: {run.failed or 'none'}")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
