"""Check that a fused decoder layer compiles: a few layers of the Llama-3-8B shape in NF4 with LoRA on all
linears and the fused blocks on (model/fused_blocks.py); torch._dynamo.explain over one fused decoder layer's
forward (graphs, graph breaks and their reasons, which qlorakit custom ops the graphs hold, the backward's included);
torch.compile of that forward with fullgraph=True (and without, if that fails); compiled against eager forward +
backward under bf16 autocast: outputs and gradients compared, each timed (median of steps).

    python3 benchmarks/compile_check.py [--out DIR] [--layers 2] [--batch 1] [--tokens 2048] [--rank 16]
                                        [--dropout 0.05] [--steps 10] [--backend inductor]
    python3 benchmarks/compile_check.py --device cpu [--backend aot_eager] ...

--device cpu (no GPU needed) builds a tiny Llama (hidden 64, 4 heads, 2 KV heads; 64 tokens) on the reference
kernels: the graph-break and equality checks of the same code paths, timings meaningless. LoRA dropout masks are
drawn by qlorakit's own ops (kernels/dropout_ops.py), so compiled and eager draw the same masks from the same seed;
torch._inductor.config.fallback_random is set as well, for any other random op.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import Run, sh  # noqa: E402

# Compiled and eager bf16 differ where inductor fuses ops and skips intermediate roundings (bf16 unit roundoff
# 2^-9 per skipped rounding); a relative norm error of 2^-6 (8 units) bounds a few such per element.
REL_TOL = 2.0 ** -6


def summarize(explain) -> dict:
    """What torch._dynamo.explain found, as JSON: graph and break counts, one line per break reason (with the
    innermost user frame), and how often each qlorakit custom op appears in the captured graphs."""
    reasons = []
    for r in explain.break_reasons:
        frame = r.user_stack[-1] if r.user_stack else None
        where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame is not None else ""
        reasons.append(r.reason.strip().splitlines()[0] + where)
    ops: Counter = Counter()
    for graph in explain.graphs:
        for module in graph.modules():  # autograd functions are captured as subgraphs (their forward and backward)
            if isinstance(module, torch.fx.GraphModule):
                for node in module.graph.nodes:
                    target = node.target
                    if isinstance(target, torch._ops.OpOverloadPacket):
                        target = target.default
                    if isinstance(target, torch._ops.OpOverload) and target.namespace == "qlorakit":
                        ops[target.name()] += 1
    return {"graphs": explain.graph_count, "graph_breaks": explain.graph_break_count, "break_reasons": reasons,
            "qlorakit_ops": dict(sorted(ops.items()))}


def table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:{width}s}  {v}" for k, v in rows)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


# --device cpu: a tiny Llama (the fused paths need more than SMALL_M_MAX = 16 rows: --tokens 64 by default there)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=101, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build(layers: int, rank: int, dropout: float, seed: int = 0, device: str = "cuda"):
    from qlorakit.model.fused_blocks import enable_fused_blocks
    from qlorakit.model.lora_inject import inject_lora
    from qlorakit.model.synthetic import synthetic_llama

    shape = "llama3-8b" if device == "cuda" else TINY
    model = synthetic_llama(shape, layers=layers, device=device, seed=seed)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(seed)
        inject_lora(model, "all-linear", r=rank, alpha=16, dropout=dropout, adapter_dtype=torch.float32)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 1e-3)  # nonzero B: every adapter path carries gradient
    report = enable_fused_blocks(model)
    model.train()
    return model, report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=None, help="2048 (cuda), 64 (cpu)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = 2048 if args.device == "cuda" else 64
    if args.device == "cuda" and not torch.cuda.is_available():
        print("compile_check: needs a CUDA GPU (the fused blocks' Triton kernels); none is visible "
              "(--device cpu: a tiny model on the reference kernels)", file=sys.stderr)
        return 2
    return check(args)


def check(args) -> int:
    import torch._inductor.config

    from qlorakit import kernels

    torch._inductor.config.fallback_random = True
    dev = args.device
    if dev == "cpu":
        kernels.set_backend("reference")
    run = Run()
    model, report = build(args.layers, args.rank, args.dropout, device=dev)
    layer = model.model.layers[0]
    run.check("layer 0 is the fused decoder layer", type(layer).__name__ == "FusedLlamaDecoderLayer", report.line())
    B, T, H = args.batch, args.tokens, model.config.hidden_size
    gen = torch.Generator(dev).manual_seed(1)
    hidden = torch.randn(B, T, H, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    grad_out = torch.randn(B, T, H, device=dev, dtype=torch.bfloat16, generator=gen)
    position_ids = torch.arange(T, device=dev).expand(B, T)
    cos, sin = model.model.rotary_emb(hidden, position_ids)
    lora = {n: p for n, p in layer.named_parameters() if p.requires_grad}

    def forward(x):
        with torch.autocast(dev, dtype=torch.bfloat16):
            return layer(x, position_ids=position_ids, position_embeddings=(cos, sin))

    def step(fn, seed: int):
        for p in [hidden, *lora.values()]:
            p.grad = None
        torch.manual_seed(seed)
        out = fn(hidden)
        out.backward(grad_out)
        return out.detach(), hidden.grad.clone(), {n: p.grad.clone() for n, p in lora.items()}

    def timed(fn) -> float:
        times = []
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        for i in range(args.steps):
            sync()
            t = time.perf_counter()
            step(fn, 100 + i)
            sync()
            times.append(time.perf_counter() - t)
        later = sorted(times[1:] or times)
        return later[len(later) // 2] * 1e3

    explained = summarize(torch._dynamo.explain(forward)(hidden))
    run.check("one fused decoder layer's forward: no graph breaks", explained["graph_breaks"] == 0,
              "; ".join(explained["break_reasons"]))
    torch._dynamo.reset()
    fullgraph = {"ok": True, "error": None}
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(forward, backend=args.backend, fullgraph=True)
        got = step(compiled, 5)
    except Exception as err:  # noqa: BLE001 - a graph break under fullgraph: recorded, then compiled without it
        fullgraph = {"ok": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"}
        torch._dynamo.reset()
        compiled = torch.compile(forward, backend=args.backend)
        got = step(compiled, 5)
    compile_s = time.perf_counter() - t0
    run.check("torch.compile(fullgraph=True) compiles forward + backward", fullgraph["ok"], fullgraph["error"] or "")
    want = step(forward, 5)
    errors = {"output": rel_err(got[0], want[0]), "d hidden": rel_err(got[1], want[1]),
              "worst LoRA grad": max(rel_err(got[2][n], want[2][n]) for n in lora)}
    run.check("compiled output and gradients match eager (relative norm error <= 2^-6)",
              all(e <= REL_TOL for e in errors.values()), ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    eager_ms, compiled_ms = timed(forward), timed(compiled)
    record = {"gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "none (cpu)", "torch": torch.__version__,
              "commit": sh("git", "rev-parse", "HEAD"), "shape": "llama3-8b" if dev == "cuda" else "tiny",
              "kernels": kernels.requested_backend(), "backend": args.backend, "layers": args.layers, "batch": B,
              "tokens": T, "rank": args.rank,
              "dropout": args.dropout, "fallback_random": True, "explain": explained, "fullgraph": fullgraph,
              "compile_s": round(compile_s, 1), "errors": errors, "eager_ms": round(eager_ms, 3),
              "compiled_ms": round(compiled_ms, 3), "checks": run.checks}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_check.json").write_text(json.dumps(record, indent=1) + "\n")
    print()
    print(table([("graphs / graph breaks", f"{explained['graphs']} / {explained['graph_breaks']}"),
                 ("qlorakit ops in the graphs", ", ".join(f"{k} x{v}" for k, v in explained["qlorakit_ops"].items())),
                 ("fullgraph", "yes" if fullgraph["ok"] else f"no: {fullgraph['error']}"),
                 ("compile (first step)", f"{compile_s:.1f} s"),
                 ("eager fwd+bwd", f"{eager_ms:.2f} ms"),
                 ("compiled fwd+bwd", f"{compiled_ms:.2f} ms ({eager_ms / compiled_ms:.2f}x)")]))
    print(f"{len(run.checks) - len(run.failed)}/{len(run.checks)} checks passed")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
