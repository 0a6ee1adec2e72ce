"""Decode speed on the Llama-3-8B shape, one process, side by side: bf16 transformers, transformers with
bitsandbytes NF4 layers, and qlorakit NF4 + a LoRA adapter (r=64, all linears, nonzero B).

    python3 benchmarks/decode.py --out DIR [--batches 1,16] [--new-tokens 64]

All three share one random-init model: its bf16 linears are measured first, then swapped for bitsandbytes
Linear4bit layers, then for qlorakit's. Greedy `generate` from a 32-token prompt, min = max new tokens, the
median of 3 timed runs after a warm-up; tokens/s = batch x new tokens / seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn


def timed_generate(model, batch: int, new_tokens: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (batch, 32), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, **dict(kw, max_new_tokens=8, min_new_tokens=8))
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return batch * new_tokens / sorted(times)[1]


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
        model = LlamaForCausalLM(LlamaConfig(**fields)).to(torch.bfloat16).eval()
    vocab = model.config.vocab_size
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, dict[str, float]] = {"bf16": {}}
    for b in batches:
        results["bf16"][f"B{b}"] = timed_generate(model, b, args.new_tokens, vocab)
        print(f"bf16 B{b}: {results['bf16'][f'B{b}']:.1f} tok/s", flush=True)
    names = list(find_target_linears(model))
    ours: dict[str, nn.Module] = {}
    theirs: dict[str, nn.Module] = {}
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        bnb = None
        results["bnb_error"] = str(err)
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
    dense = {n: model.get_submodule(n) for n in names}
    if bnb is not None:
        swap(model, theirs)
        results["bnb_nf4"] = {}
        for b in batches:
            results["bnb_nf4"][f"B{b}"] = timed_generate(model, b, args.new_tokens, vocab)
            print(f"bnb nf4 B{b}: {results['bnb_nf4'][f'B{b}']:.1f} tok/s", flush=True)
    swap(model, ours)
    del dense
    torch.cuda.empty_cache()
    results["qlorakit_nf4_lora"] = {}
    for b in batches:
        results["qlorakit_nf4_lora"][f"B{b}"] = timed_generate(model, b, args.new_tokens, vocab)
        print(f"qlorakit nf4+adapter B{b}: {results['qlorakit_nf4_lora'][f'B{b}']:.1f} tok/s", flush=True)
    record = {"date": datetime.now(timezone.utc).isoformat(), "commit": os.environ.get("QLORAKIT_COMMIT", "?"),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(args),
              "tokens_per_s": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{'system':22s} " + " ".join(f"{'B' + str(b):>10s}" for b in batches))
    for k, v in results.items():
        if isinstance(v, dict):
            print(f"{k:22s} " + " ".join(f"{v[f'B{b}']:10.1f}" for b in batches))
    for b in batches:
        print(f"B{b}: qlorakit NF4+adapter / bf16 = {results['qlorakit_nf4_lora'][f'B{b}'] / results['bf16'][f'B{b}']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
