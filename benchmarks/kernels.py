#!/usr/bin/env python3
"""Benchmark and GPU self-check of qlorakit's Triton kernels (CUDA only).

    python3 benchmarks/kernels.py --out DIR

In one process: the two ceilings (device-to-device copy bandwidth, bytes read + written; bf16 matmul 8192^3),
then for each weight shape N x K (14336x4096, 28672x8192; NF4, blocksize 64, double-quantized):
  (a) correctness on fresh random data against the plain-PyTorch reference on this GPU, printed PASS/FAIL:
      quantize and dequantize bit-identical (also FP4, non-nested, fp16/fp32 outputs and small odd shapes),
      GEMV / fused / training matmul within the stated tolerance of an fp64 product;
  (b) timings (triton.testing.do_bench, median; each call takes the next of several input sets, enough that
      the sets together are several times the L2): dequantize vs bitsandbytes vs a copy of the same bytes;
      training matmul forward and backward at 4096 tokens vs torch bf16 (and bitsandbytes); GEMV at batch
      1, 4, 16 vs the bf16 GEMV (and bitsandbytes' gemv path); the fused kernel against dequantize + cuBLAS
      over a range of rows (the dispatch threshold); quantize vs the reference.
Prints a short table last and writes every number to DIR/kernels.json. Exits 1 if a correctness check fails.
On an H200 (2026-11-29) the run took 70 s plus Triton's compiles and peaked at 8.4 GiB of GPU memory.
Small calls (GEMV, dequantize of the smaller shape) are also timed by CUDA-graph replay ("graph"), which leaves
out the host's launch cost; do_bench's numbers include it whenever the host is slower than the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from bench_common import Run, sh  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from qlorakit.kernels import triton_matmul  # noqa: E402
from qlorakit.kernels.reference import linear_4bit_ref  # noqa: E402
from qlorakit.kernels.triton_dequant import dequantize_4bit_triton, dequantize_into  # noqa: E402
from qlorakit.kernels.triton_gemv import GemmConfig, matmul_4bit_small  # noqa: E402
from qlorakit.kernels.triton_matmul import linear_4bit_grad_input_triton, linear_4bit_triton  # noqa: E402
from qlorakit.kernels.triton_quant import quantize_4bit_triton  # noqa: E402
from qlorakit.nn.linear4bit import linear_4bit as linear_4bit_autograd  # noqa: E402
from qlorakit.quant.state import QuantState, dequantize_4bit, quantize_4bit  # noqa: E402

SHAPES = [(14336, 4096), (28672, 8192)]
BLOCKSIZE = 64
TOKENS = 4096
GEMV_BATCHES = (1, 4, 16)
CROSSOVER_ROWS = (16, 32, 64, 256)
GEMV_ONLY = False  # --gemv-only: stop each shape after the GEMV sections (exploration runs)
L2_BYTES = 60 * 2**20  # H200; read from the device when torch exposes it
# Relative error bounds against an fp64 product of the same dequantized W (bf16 inputs and output: the output
# rounding, 2^-9 relative, dominates; fp32 accumulation adds far less).
TOL_BF16 = 1e-2


def load_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        return bnb, bnbf, getattr(bnb, "__version__", "unknown")
    except Exception as err:  # noqa: BLE001 - any failure means: not available here
        return None, None, f"bnb not available ({type(err).__name__}: {err})"


def timed(fns: list, graph: bool = False) -> float:
    """Median ms of one call, each call taking the next function (input set) in turn."""
    it = itertools.cycle(fns)

    def step():
        return next(it)()

    if graph:
        return do_bench_cudagraph(step, rep=50, return_mode="median")
    return do_bench(step, warmup=25, rep=100, return_mode="median")


def n_sets(bytes_per_set: int, l2: int) -> int:
    """Input sets to rotate so that together they are at least 4x the L2 (at least 2, at most 8)."""
    return max(2, min(8, math.ceil(4 * l2 / max(1, bytes_per_set))))


def state_bytes(packed: torch.Tensor, state: QuantState) -> int:
    total = packed.numel()
    if state.nested is not None:
        total += state.nested.quantized.numel() + 4 * state.nested.absmax.numel() + 4
    else:
        total += 4 * state.absmax.numel()
    return total


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so -0.0 != 0.0 and NaN == NaN)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def ceilings(device: torch.device) -> dict:
    n = 2**29  # 1 GiB of bf16 each way
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    copy_bw = 2 * n * 2 / (ms * 1e-3)
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    ms_mm = do_bench(lambda: torch.mm(a, b, out=c), warmup=50, rep=300, return_mode="median")
    flops = 2 * 8192**3 / (ms_mm * 1e-3)
    del a, b, c
    torch.cuda.empty_cache()
    out = {"copy_bytes_per_s": copy_bw, "copy_ms_2GiB": ms, "bf16_matmul_flops": flops, "bf16_matmul_ms": ms_mm}
    print(f"ceilings: copy {copy_bw / 1e12:.2f} TB/s (read+write), bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
    return out


def bit_identity_checks(run: Run, device: torch.device) -> None:
    """Small shapes and edge cases, every variant, on this GPU: exact equality with the reference."""
    cases = [
        ((14336 // 8, 4096 // 8), 64, "nf4", True),
        ((37, 67), 64, "nf4", True),  # odd numel, K not a multiple of the blocksize, short tail block
        ((129, 4097), 128, "fp4", False),
        ((3, 5), 32, "fp4", True),
        ((301, 1000), 4096, "nf4", True),
        ((64, 256), 32, "nf4", False),
    ]
    for shape, bs, qt, dq in cases:
        w = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
        flat = w.view(-1)
        flat[: min(bs, flat.numel())] = 0  # an all-zero block
        if flat.numel() > 3 * bs:
            flat[bs : 2 * bs] = torch.tensor(1e-30, device=device)  # subnormal-free tiny block
        for xdtype in (torch.bfloat16, torch.float32):
            x = w.to(xdtype)
            p_ref, s_ref = quantize_4bit(x, bs, qt, dq)
            p, s = quantize_4bit_triton(x, bs, qt, dq)
            same = torch.equal(p, p_ref) and torch.equal(s.absmax_fp32(), s_ref.absmax_fp32())
            if dq:
                same = same and torch.equal(s.nested.quantized, s_ref.nested.quantized) and torch.equal(
                    s.nested.absmax, s_ref.nested.absmax) and torch.equal(s.nested.offset, s_ref.nested.offset)
            run.check(f"quantize bit-identical {shape} bs{bs} {qt} dq={dq} from {xdtype}", same)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            out, ref = dequantize_4bit_triton(p_ref, s_ref, dtype), dequantize_4bit(p_ref, s_ref, dtype)
            same = torch.equal(bits(out), bits(ref))
            run.check(f"dequantize bit-identical {shape} bs{bs} {qt} dq={dq} -> {dtype}", same)


def small_matmul_checks(run: Run, device: torch.device) -> None:
    """linear_4bit's kernels at small and awkward shapes on this GPU, against an fp64 product of the reference W:
    K not a multiple of the blocksize (blocks straddle rows), odd K, odd N, 1..16 rows, bias, three dtypes."""
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: TOL_BF16}
    for (n_out, k, bs, qt, dq) in [(257, 512, 64, "nf4", True), (37, 67, 64, "nf4", True), (64, 96, 64, "fp4", False),
                                   (33, 8192, 4096, "nf4", True)]:
        w = torch.randn(n_out, k, device=device)
        p, s = quantize_4bit(w, bs, qt, dq)
        w64 = dequantize_4bit(p, s, torch.float32).double()
        for dtype, rows in itertools.product((torch.bfloat16, torch.float16, torch.float32), (1, 3, 16)):
            x = torch.randn(rows, k, device=device, dtype=dtype)
            b = torch.randn(n_out, device=device, dtype=dtype)
            y = linear_4bit_triton(x, p, s, b)
            err = rel_err(y, x.double() @ w64.T + b.double())
            run.check(f"linear_4bit {n_out}x{k} bs{bs} {qt} dq={dq} rows={rows} {dtype} "
                      f"({triton_matmul.plan(rows, dtype)}) rel err {err:.1e} <= {tol[dtype]:g}", err <= tol[dtype])


def shape_bench(run: Run, n_out: int, k: int, device: torch.device, ceil: dict, bnb_mods, l2: int) -> dict:
    bnb, bnbf, _ = bnb_mods
    res: dict = {}
    tag = f"{n_out}x{k}"
    numel = n_out * k
    print(f"\n== {tag} ==", flush=True)

    # Input sets: fresh random weights, quantized by our kernel (set 0 is also checked against the reference).
    w0 = torch.randn(n_out, k, device=device, dtype=torch.bfloat16) * 0.02
    p_ref, s_ref = quantize_4bit(w0, BLOCKSIZE, "nf4", True)
    p0, s0 = quantize_4bit_triton(w0, BLOCKSIZE, "nf4", True)
    run.check(f"{tag} quantize nf4+dq bit-identical", torch.equal(p0, p_ref)
              and torch.equal(s0.nested.quantized, s_ref.nested.quantized)
              and torch.equal(s0.nested.absmax, s_ref.nested.absmax) and torch.equal(s0.nested.offset,
                                                                                    s_ref.nested.offset))
    packed_set_bytes = state_bytes(p0, s0)
    sets = [(p0, s0)]
    for _ in range(n_sets(packed_set_bytes, l2) - 1):
        w = torch.randn(n_out, k, device=device, dtype=torch.bfloat16) * 0.02
        sets.append(quantize_4bit_triton(w, BLOCKSIZE, "nf4", True))
        del w
    w_ref = dequantize_4bit(p0, s0, torch.bfloat16)
    dense_sets = [w_ref] + [dequantize_4bit_triton(p, s, torch.bfloat16) for p, s in sets[1: n_sets(numel * 2, l2)]]
    res["sets"] = {"packed": len(sets), "dense": len(dense_sets), "packed_set_bytes": packed_set_bytes}

    # (a) dequantize: bit-identical on fresh data, every output dtype, nested and not.
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        run.check(f"{tag} dequantize nf4+dq -> {dtype} bit-identical",
                  torch.equal(bits(dequantize_4bit_triton(p0, s0, dtype)), bits(dequantize_4bit(p0, s0, dtype))))
    p_plain, s_plain = quantize_4bit_triton(w0, BLOCKSIZE, "fp4", False)
    run.check(f"{tag} dequantize fp4 -> bf16 bit-identical",
              torch.equal(bits(dequantize_4bit_triton(p_plain, s_plain, torch.bfloat16)),
                          bits(dequantize_4bit(p_plain, s_plain, torch.bfloat16))))
    del p_plain, s_plain

    # (b) dequantize timings.
    out = torch.empty(n_out, k, device=device, dtype=torch.bfloat16)
    deq_bytes = packed_set_bytes + numel * 2
    t_ours = timed([lambda p=p, s=s: dequantize_into(p, s, out) for p, s in sets])
    half = deq_bytes // 2
    cp_src = [torch.empty(half, device=device, dtype=torch.uint8).random_() for _ in range(len(sets))]
    cp_dst = torch.empty(half, device=device, dtype=torch.uint8)
    t_copy = timed([lambda s=s: cp_dst.copy_(s) for s in cp_src])
    del cp_src, cp_dst
    res["dequantize"] = {"ours_ms": t_ours, "copy_same_bytes_ms": t_copy, "bytes": deq_bytes,
                         "ours_pct_of_copy_ceiling": 100 * deq_bytes / (t_ours * 1e-3) / ceil["copy_bytes_per_s"]}
    bnb_w = None
    if bnb is not None:
        bnb_w = []
        for i in range(len(sets)):
            wb = w0 if i == 0 else torch.randn(n_out, k, device=device, dtype=torch.bfloat16) * 0.02
            bnb_w.append(bnbf.quantize_4bit(wb, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True,
                                            quant_storage=torch.uint8))
        res["dequantize"]["bnb_ms"] = timed([lambda pq=pq: bnbf.dequantize_4bit(pq[0], pq[1]) for pq in bnb_w])
        # Information, not a check: bitsandbytes' CUDA quantizer is not the specification (its CPU path is).
        res["dequantize"]["bnb_cuda_packs_same_bytes"] = torch.equal(bnb_w[0][0].view(-1), p0.view(-1))
    print(f"dequantize: ours {t_ours * 1e3:.1f} us ({res['dequantize']['ours_pct_of_copy_ceiling']:.0f}% of copy "
          f"ceiling), copy of same bytes {t_copy * 1e3:.1f} us"
          + (f", bnb {res['dequantize']['bnb_ms'] * 1e3:.1f} us" if bnb is not None else ""), flush=True)

    # GEMV and small-M fused kernel: correctness against fp64, then timings vs the bf16 GEMV.
    w64 = w_ref.double()
    res["gemv"] = {}
    for m in GEMV_BATCHES:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        y = linear_4bit_triton(x, p0, s0)
        path = triton_matmul.plan(m, x.dtype)
        err = rel_err(y, x.double() @ w64.T)
        run.check(f"{tag} linear_4bit rows={m} ({path}) rel err {err:.1e} <= {TOL_BF16:g}", err <= TOL_BF16)
        xs = [torch.randn(m, k, device=device, dtype=torch.bfloat16) for _ in sets]
        entry = {
            "path": path, "rel_err": err,
            "ours_ms": timed([lambda x=x, p=p, s=s: linear_4bit_triton(x, p, s) for x, (p, s) in zip(xs, sets)]),
            "bf16_ms": timed([lambda x=x, w=w: torch.nn.functional.linear(x, w)
                              for x, w in zip(xs, itertools.cycle(dense_sets))]),
        }
        try:
            entry["ours_graph_ms"] = timed([lambda x=x, p=p, s=s: linear_4bit_triton(x, p, s)
                                            for x, (p, s) in zip(xs, sets)], graph=True)
            entry["bf16_graph_ms"] = timed([lambda x=x, w=w: torch.nn.functional.linear(x, w)
                                            for x, w in zip(xs, itertools.cycle(dense_sets))], graph=True)
        except Exception as err:  # noqa: BLE001 - graph timing is a second opinion only
            entry["graph_error"] = repr(err)
        if bnb_w is not None:
            xb = [x.clone() for x in xs]
            entry["bnb_ms"] = timed([lambda x=x, pq=pq: bnb.matmul_4bit(x, pq[0].t(), quant_state=pq[1])
                                     for x, pq in zip(xb, itertools.cycle(bnb_w))])
        entry["bytes_4bit"] = packed_set_bytes + 2 * m * (k + n_out)
        entry["ours_pct_of_copy_ceiling"] = 100 * entry["bytes_4bit"] / (entry["ours_ms"] * 1e-3) / ceil[
            "copy_bytes_per_s"]
        res["gemv"][m] = entry
        print(f"rows {m:>2} ({path}): ours {entry['ours_ms'] * 1e3:.1f} us, bf16 {entry['bf16_ms'] * 1e3:.1f} us, "
              f"x{entry['ours_ms'] / entry['bf16_ms']:.2f}"
              + (f" (graph x{entry['ours_graph_ms'] / entry['bf16_graph_ms']:.2f})" if "ours_graph_ms" in entry
                 else "")
              + (f", bnb {entry['bnb_ms'] * 1e3:.1f} us" if "bnb_ms" in entry else ""), flush=True)

    del xs, x
    if GEMV_ONLY:
        return res

    # Where the fused kernel stops beating dequantize + cuBLAS (the dispatch threshold SMALL_M_MAX).
    res["crossover"] = {}
    for m in CROSSOVER_ROWS:
        cfg = GemmConfig() if m <= 16 else GemmConfig(block_m=64, block_n=64, k_tile=128, num_warps=4)
        xs = [torch.randn(m, k, device=device, dtype=torch.bfloat16) for _ in sets]
        y = matmul_4bit_small(xs[0], p0, s0, config=cfg)
        err = rel_err(y, xs[0].double() @ w64.T)
        run.check(f"{tag} fused rows={m} rel err {err:.1e} <= {TOL_BF16:g}", err <= TOL_BF16)
        t_fused = timed([lambda x=x, p=p, s=s: matmul_4bit_small(x, p, s, config=cfg) for x, (p, s) in zip(xs, sets)])

        def dq_mm(x, p, s):
            return torch.nn.functional.linear(x, triton_matmul.dense_weight(p, s, x.dtype))

        t_dq = timed([lambda x=x, p=p, s=s: dq_mm(x, p, s) for x, (p, s) in zip(xs, sets)])
        res["crossover"][m] = {"fused_ms": t_fused, "dequant_matmul_ms": t_dq, "rel_err": err}
        print(f"rows {m:>4}: fused {t_fused * 1e3:.1f} us, dequant+cuBLAS {t_dq * 1e3:.1f} us", flush=True)
    del w64

    # Training matmul at 4096 tokens: forward (no grad) and backward (input gradient), vs bf16 and bnb.
    x = torch.randn(TOKENS, k, device=device, dtype=torch.bfloat16)
    dy = torch.randn(TOKENS, n_out, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        y = linear_4bit_triton(x, p0, s0)
        y_ref = linear_4bit_ref(x, p0, s0)
        gx = linear_4bit_grad_input_triton(dy, p0, s0)
    err_f, err_b = rel_err(y, y_ref), rel_err(gx, dy @ w_ref)
    run.check(f"{tag} training forward vs reference rel err {err_f:.1e} <= {TOL_BF16:g}", err_f <= TOL_BF16)
    run.check(f"{tag} training backward vs reference rel err {err_b:.1e} <= {TOL_BF16:g}", err_b <= TOL_BF16)
    xr = x.clone().requires_grad_()
    ya = linear_4bit_autograd(xr, p0, s0)
    (ga,) = torch.autograd.grad(ya, xr, dy)
    run.check(f"{tag} autograd through nn.linear_4bit matches", torch.equal(ga, gx) and torch.equal(ya, y))
    del xr, ya, ga, y, y_ref, gx
    with torch.no_grad():
        fwd = {
            "ours_ms": timed([lambda p=p, s=s: linear_4bit_triton(x, p, s) for p, s in sets]),
            "bf16_ms": timed([lambda w=w: torch.nn.functional.linear(x, w) for w in dense_sets]),
        }
        bwd = {
            "ours_ms": timed([lambda p=p, s=s: linear_4bit_grad_input_triton(dy, p, s) for p, s in sets]),
            "bf16_ms": timed([lambda w=w: dy @ w for w in dense_sets]),
        }
        if bnb_w is not None:
            fwd["bnb_ms"] = timed([lambda pq=pq: bnb.matmul_4bit(x, pq[0].t(), quant_state=pq[1]) for pq in bnb_w])
            # bitsandbytes' backward for the input: dequantize W, then dY W (its MatMul4Bit.backward).
            bwd["bnb_ms"] = timed([lambda pq=pq: dy @ bnbf.dequantize_4bit(pq[0], pq[1]).to(dy.dtype)
                                   for pq in bnb_w])
    flops = 2 * TOKENS * n_out * k
    for d in (fwd, bwd):
        d["ours_tflops"] = flops / (d["ours_ms"] * 1e-3) / 1e12
    res["train_forward"], res["train_backward"] = fwd, bwd
    print(f"train fwd: ours {fwd['ours_ms']:.3f} ms, bf16 {fwd['bf16_ms']:.3f} ms, "
          f"x{fwd['ours_ms'] / fwd['bf16_ms']:.3f}; bwd: ours {bwd['ours_ms']:.3f} ms, bf16 {bwd['bf16_ms']:.3f} ms, "
          f"x{bwd['ours_ms'] / bwd['bf16_ms']:.3f}",
          flush=True)
    del x, dy

    # Quantize (quantize-on-load): ours vs the reference on this GPU, from bf16.
    res["quantize"] = {
        "ours_ms": timed([lambda w=w: quantize_4bit_triton(w, BLOCKSIZE, "nf4", True) for w in dense_sets]),
        "reference_ms": timed([lambda w=w: quantize_4bit(w, BLOCKSIZE, "nf4", True) for w in dense_sets]),
    }
    print(f"quantize: ours {res['quantize']['ours_ms']:.3f} ms, reference {res['quantize']['reference_ms']:.3f} ms",
          flush=True)
    del sets, dense_sets, out, bnb_w, w0, w_ref
    triton_matmul.release_workspace()
    torch.cuda.empty_cache()
    return res


def table(results: dict) -> str:
    ceil = results["ceilings"]
    lines = [
        f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {ceil['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s;"
        f" {results['gpu']}; bnb: {results['versions']['bitsandbytes']}",
        f"{'shape':<12}{'what':<28}{'ours':>10}{'ref':>10}{'ratio':>9}  {'bnb ratio':>9}",
    ]
    for tag, r in results["shapes"].items():
        d = r["dequantize"]
        bnb = f"{d['bnb_ms'] / d['copy_same_bytes_ms']:.2f}" if "bnb_ms" in d else "-"
        lines.append(f"{tag:<12}{'dequant (x copy same bytes)':<28}{d['ours_ms'] * 1e3:>8.1f}us"
                     f"{d['copy_same_bytes_ms'] * 1e3:>8.1f}us{d['ours_ms'] / d['copy_same_bytes_ms']:>9.2f}  {bnb:>9}"
                     f"   {d['ours_pct_of_copy_ceiling']:.0f}% of copy BW")
        for m, g in r["gemv"].items():
            bnb = f"{g['bnb_ms'] / g['bf16_ms']:.2f}" if "bnb_ms" in g else "-"
            graph = f"   graph x{g['ours_graph_ms'] / g['bf16_graph_ms']:.2f}" if "ours_graph_ms" in g else ""
            lines.append(f"{tag:<12}{f'GEMV rows={m} (x bf16)':<28}{g['ours_ms'] * 1e3:>8.1f}us"
                         f"{g['bf16_ms'] * 1e3:>8.1f}us{g['ours_ms'] / g['bf16_ms']:>9.2f}  {bnb:>9}{graph}")
        for name, key in (("train fwd 4096 (x bf16)", "train_forward"), ("train bwd 4096 (x bf16)", "train_backward")):
            t = r[key]
            bnb = f"{t['bnb_ms'] / t['bf16_ms']:.2f}" if "bnb_ms" in t else "-"
            lines.append(f"{tag:<12}{name:<28}{t['ours_ms']:>8.3f}ms{t['bf16_ms']:>8.3f}ms"
                         f"{t['ours_ms'] / t['bf16_ms']:>9.3f}  {bnb:>9}")
        q = r["quantize"]
        lines.append(f"{tag:<12}{'quantize (x reference)':<28}{q['ours_ms']:>8.3f}ms{q['reference_ms']:>8.3f}ms"
                     f"{q['ours_ms'] / q['reference_ms']:>9.3f}")
        cross = ", ".join(f"{m}: {c['fused_ms'] / c['dequant_matmul_ms']:.2f}" for m, c in r["crossover"].items())
        lines.append(f"{tag:<12}fused / (dequant+cuBLAS) by rows: {cross}")
    failed = results["failed_checks"]
    lines.append(f"checks: {len(results['checks']) - len(failed)}/{len(results['checks'])} PASS"
                 + (f"; FAILED: {failed}" if failed else ""))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for kernels.json")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                        help="weight shapes NxK, comma-separated (default: %(default)s)")
    parser.add_argument("--gemv-only", action="store_true", help="only the checks and the GEMV sections")
    args = parser.parse_args()
    global GEMV_ONLY
    GEMV_ONLY = args.gemv_only
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this benchmark times compiled kernels", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or L2_BYTES
    bnb_mods = load_bnb()
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("QLORAKIT_COMMIT") or sh("git", "rev-parse", "HEAD"),
        "git_dirty": sh("git", "status", "--porcelain", "--untracked-files=no") not in ("", "unknown"),
        "gpu": torch.cuda.get_device_name(device),
        "sm_count": props.multi_processor_count,
        "l2_bytes": l2,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda, "bitsandbytes": bnb_mods[2]},
        "config": {"blocksize": BLOCKSIZE, "quant_type": "nf4", "double_quant": True, "tokens": TOKENS,
                   "small_m_max": triton_matmul.SMALL_M_MAX, "timer": "triton.testing.do_bench median, ms"},
        "shapes": {},
    }
    print(f"{results['gpu']}, torch {torch.__version__}, triton {triton.__version__}, bnb: {bnb_mods[2]}", flush=True)
    run = Run()
    start = time.time()
    try:
        results["ceilings"] = ceilings(device)
        bit_identity_checks(run, device)
        small_matmul_checks(run, device)
        for spec in args.shapes.split(","):
            n_out, k = (int(v) for v in spec.lower().split("x"))
            results["shapes"][f"{n_out}x{k}"] = shape_bench(run, n_out, k, device, results["ceilings"], bnb_mods, l2)
    except Exception:  # noqa: BLE001 - record what broke, keep the numbers gathered so far
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        run.check("benchmark ran to the end", False, tb.strip().splitlines()[-1])
    results["checks"] = run.checks
    results["failed_checks"] = run.failed
    results["seconds"] = time.time() - start
    results["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    (args.out / "kernels.json").write_text(json.dumps(results, indent=2, default=str))
    print()
    if results["shapes"] and all(
        k in r for r in results["shapes"].values() for k in ("dequantize", "gemv", "train_forward", "quantize")
    ):
        print(table(results))
    else:
        print(f"checks: {len(run.checks) - len(run.failed)}/{len(run.checks)} PASS; FAILED: {run.failed}")
    print(f"wrote {args.out / 'kernels.json'} ({results['seconds']:.0f} s, peak "
          f"{results['peak_memory_bytes'] / 2**30:.1f} GiB)")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
