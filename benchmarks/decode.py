"""Decode speed on the Llama-3-8B shape, one process, side by side: bf16 transformers, transformers with
bitsandbytes NF4 layers, and qlorakit NF4 + a LoRA adapter (r=64, all linears, nonzero B).

    python3 benchmarks/decode.py --out DIR [--batches 1,16] [--new-tokens 64]

All systems share one random-init model: its bf16 linears are measured first, then swapped for bitsandbytes
Linear4bit layers, then for qlorakit's. Two ways to decode:
  hf      transformers' `generate` (greedy, eager, dynamic cache): what users run by default;
  static  qlorakit's decoder (infer/decode.py: static KV cache, the one-token step replayed as a CUDA graph),
          what `qlorakit generate` / `chat` use; run on bf16 as well, so that the graph's gain is not credited
          to the 4-bit layers.
From a 32-token prompt, min = max new tokens, tokens/s = batch x new tokens / seconds, the median of 3 timed
runs after a warm-up, prefill (and graph capture) included; `steady` is the per-token rate without them,
batch x (N - 8) / (T(N) - T(8)).
Checks (printed, in the JSON): for each system, the static decoder's tokens with the graph equal its eager tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

PROMPT = 32


def hf_run(model, ids: torch.Tensor, new_tokens: int) -> None:
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def static_run(model, ids: torch.Tensor, new_tokens: int, graphs: bool = True, report: dict | None = None
               ) -> torch.Tensor:
    from qlorakit.infer.decode import decode_tokens

    steps = list(decode_tokens(model, ids, None, max_new_tokens=new_tokens, eos_ids=[-1], pad_id=0, graphs=graphs,
                               report=report))
    return torch.stack(steps, dim=1)


def timed(fn, model, ids, new_tokens: int) -> float:
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(model, ids, new_tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(name: str, fn, model, batches: list[int], new_tokens: int, vocab: int, out: dict) -> None:
    for b in batches:
        ids = torch.randint(0, vocab, (b, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(b))
        fn(model, ids, 8)  # warm-up: kernels compiled, caches sized
        t_full = timed(fn, model, ids, new_tokens)
        t_short = timed(fn, model, ids, 8)
        rec = {"tokens_per_s": b * new_tokens / t_full,
               "steady_tokens_per_s": b * (new_tokens - 8) / max(1e-9, t_full - t_short),
               "seconds": t_full, "seconds_8_tokens": t_short}
        out.setdefault(name, {})[f"B{b}"] = rec
        print(f"{name:28s} B{b:<3d} {rec['tokens_per_s']:8.1f} tok/s  (steady {rec['steady_tokens_per_s']:8.1f})",
              flush=True)


def graph_check(name: str, model, batches: list[int], vocab: int, checks: list) -> None:
    for b in batches:
        ids = torch.randint(0, vocab, (b, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(7))
        report: dict = {}
        with_graph = static_run(model, ids, 16, graphs=True, report=report)
        eager = static_run(model, ids, 16, graphs=False)
        ok = bool(report.get("graph")) and torch.equal(with_graph, eager)
        checks.append({"name": f"{name} B{b}: static decoder, CUDA graph == eager tokens (16 new)", "pass": ok,
                       "graph": report.get("graph")})
        print(f"check {checks[-1]['name']}: {'PASS' if ok else 'FAIL'} (graph used: {report.get('graph')})",
              flush=True)


def swap(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    for name, layer in layers.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-hf-ours", action="store_true", help="skip qlorakit layers under transformers' generate")
    ap.add_argument("--bank-adapters", type=int, default=4,
                    help="also decode with this many adapters held at once, one per row (0: skip)")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlorakit.model.synthetic import SHAPES
    from qlorakit.model.targets import find_target_linears
    from qlorakit.nn import Linear4bit, LoraLinear

    fields = dict(SHAPES["llama3-8b"])
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).to(torch.bfloat16).eval()
    vocab = model.config.vocab_size
    batches = [int(b) for b in args.batches.split(",")]
    n = args.new_tokens
    results: dict[str, dict] = {}
    checks: list[dict] = []
    t_start = time.time()

    measure("bf16 / hf generate", hf_run, model, batches, n, vocab, results)
    graph_check("bf16", model, batches, vocab, checks)
    measure("bf16 / static+graph", static_run, model, batches, n, vocab, results)

    names = list(find_target_linears(model))
    ours: dict[str, nn.Module] = {}
    theirs: dict[str, nn.Module] = {}
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        bnb = None
        results["bnb_error"] = {"error": str(err)}
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name in names:
        lin = model.get_submodule(name)
        base = Linear4bit.from_linear(lin)
        base.dtype = torch.bfloat16
        lora = LoraLinear(base, r=64, alpha=16, dropout=0.0, adapter_dtype=torch.bfloat16)
        with torch.no_grad():
            lora.lora_B.weight.normal_(0.0, 0.01, generator=gen)
        ours[name] = lora.eval()
        if bnb is not None:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            theirs[name] = q.cuda()
    dense = {n_: model.get_submodule(n_) for n_ in names}
    if bnb is not None:
        swap(model, theirs)
        measure("bnb nf4 / hf generate", hf_run, model, batches, n, vocab, results)
    swap(model, ours)
    del dense, theirs
    torch.cuda.empty_cache()
    graph_check("qlorakit nf4+lora", model, batches, vocab, checks)
    measure("qlorakit nf4+lora / static+graph", static_run, model, batches, n, vocab, results)
    if not args.skip_hf_ours:
        measure("qlorakit nf4+lora / hf generate", hf_run, model, batches, n, vocab, results)
    if args.bank_adapters:
        # Several adapters at once (what `qlorakit serve` holds): each row of the batch takes adapter i % n.
        from qlorakit.nn.lora import AdapterBankSlot

        k = args.bank_adapters
        rows = torch.tensor([i % (k + 1) for i in range(64)], device="cuda")
        for lora in ours.values():
            a = torch.randn(k + 1, 64, lora.in_features, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            b = torch.randn(k + 1, lora.out_features, 64, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.01
            a[0].zero_()
            b[0].zero_()
            lora.set_bank(AdapterBankSlot(a, b, torch.full((k + 1,), 0.25, device="cuda"), rows))
        name = f"qlorakit nf4+{k} adapters per row / static+graph"
        graph_check(f"qlorakit nf4+{k} adapters per row", model, batches, vocab, checks)
        measure(name, static_run, model, batches, n, vocab, results)

    record = {"date": datetime.now(timezone.utc).isoformat(), "commit": os.environ.get("QLORAKIT_COMMIT", "?"),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(args),
              "results": results, "checks": checks, "seconds": time.time() - t_start,
              "notes": __doc__}
    ours_b = results["qlorakit nf4+lora / static+graph"]
    targets = []
    for b in batches:
        for ref in ("bf16 / hf generate", "bf16 / static+graph"):
            r = ours_b[f"B{b}"]["tokens_per_s"] / results[ref][f"B{b}"]["tokens_per_s"]
            targets.append({"name": f"B{b}: qlorakit NF4+adapter (static+graph) / {ref}", "ratio": r,
                            "faster": r > 1.0})
    record["comparisons"] = targets
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{'system / decoding':36s} " + " ".join(f"{'B' + str(b) + ' tok/s':>12s}{'steady':>9s}" for b in batches))
    for k, v in results.items():
        if "error" in v:
            print(f"{k:36s} {v['error']}")
            continue
        print(f"{k:36s} " + " ".join(f"{v[f'B{b}']['tokens_per_s']:12.1f}{v[f'B{b}']['steady_tokens_per_s']:9.1f}"
                                     for b in batches))
    for t in targets:
        print(f"{t['name']}: {t['ratio']:.2f}x")
    print(f"checks: {sum(c['pass'] for c in checks)}/{len(checks)} PASS")
    return 0 if all(c["pass"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
