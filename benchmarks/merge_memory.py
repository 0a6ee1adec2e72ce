"""Peak host memory of `qlorakit merge` on a synthetic multi-shard bf16 checkpoint (default ~2 GB in 4 shards).

Builds a Llama-shaped checkpoint of random bf16 tensors shard by shard with the streaming SafetensorsWriter (the
builder holds one tensor at a time) and a rank-16 adapter on every block linear, then merges in a fresh Python
process and reads that process's peak resident set size (getrusage ru_maxrss) before and after the merge. The
growth is what the merge itself needed; the claim checked is growth <= 1.5 x the largest shard.

    python benchmarks/merge_memory.py --out benchmarks/results/merge-memory-cpu.json    # CPU: a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 2048, 5632, 16, 256
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
RANK = 16

_CHILD = r"""
import json, resource, sys, time
from qlorakit.adapters.merge import merge_adapter
def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
before = rss_mib()
t0 = time.perf_counter()
report = merge_adapter(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
print(json.dumps({"peak_rss_before_mib": before, "peak_rss_after_mib": rss_mib(),
                  "merge_seconds": time.perf_counter() - t0, "merged_linears": report.merged_linears,
                  "largest_shard_bytes": report.largest_shard_bytes}))
"""


def build_checkpoint(folder: Path, layers: int, shards: int, seed: int = 0) -> list[int]:
    """A LlamaForCausalLM folder of random bf16 weights in `shards` files; returns the shard sizes in bytes."""
    import torch

    from qlorakit.model.safetensors_writer import SafetensorsWriter

    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    per_shard = -(-layers // shards)
    weight_map: dict[str, str] = {}
    sizes = []
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        with SafetensorsWriter(folder / name, metadata={"format": "pt"}) as w:
            tensors = []
            if s == 0:
                tensors.append(("model.embed_tokens.weight", (VOCAB, HIDDEN)))
            for layer in range(s * per_shard, min(layers, (s + 1) * per_shard)):
                p = f"model.layers.{layer}."
                tensors += [(p + "input_layernorm.weight", (HIDDEN,)),
                            (p + "post_attention_layernorm.weight", (HIDDEN,))]
                tensors += [(p + mod + ".weight", shape) for mod, shape in LINEARS.items()]
            if s == shards - 1:
                tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
            for key, shape in tensors:
                w.add(key, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
                weight_map[key] = name
        sizes.append((folder / name).stat().st_size)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sizes


def build_adapter(folder: Path, layers: int, seed: int = 1) -> None:
    """A PEFT LoRA adapter (rank 16, alpha 32) with random A and B on every block linear."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for mod, (out_f, in_f) in LINEARS.items():
            key = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[key + ".lora_A.weight"] = torch.randn(RANK, in_f, generator=gen) * 0.01
            tensors[key + ".lora_B.weight"] = torch.randn(out_f, RANK, generator=gen) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in LINEARS}), "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def measure(size_gb: float = 2.0, shards: int = 4, workdir: Path | None = None) -> dict:
    """Build, merge in a subprocess, and return every number (sizes in bytes, memory in MiB)."""
    per_layer = 2 * sum(o * i for o, i in LINEARS.values())
    layers = max(shards, math.ceil(size_gb * 1e9 / per_layer))
    root = Path(tempfile.mkdtemp(prefix="merge-memory-", dir=workdir))
    try:
        t0 = time.perf_counter()
        sizes = build_checkpoint(root / "base", layers, shards)
        build_adapter(root / "adapter", layers)
        build_seconds = time.perf_counter() - t0
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(root / "base"), str(root / "adapter"),
                               str(root / "merged")], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"merge failed:\n{proc.stderr[-4000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    largest_mib = max(sizes) / 2**20
    growth = child["peak_rss_after_mib"] - child["peak_rss_before_mib"]
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(), "python": platform.python_version(),
        "layers": layers, "shards": shards, "shard_bytes": sizes, "total_bytes": sum(sizes),
        "largest_shard_mib": largest_mib, "build_seconds": build_seconds, **child,
        "peak_rss_growth_mib": growth, "growth_over_largest_shard": growth / largest_mib,
        "claim": "peak_rss_growth_mib <= 1.5 * largest_shard_mib",
        "claim_holds": growth <= 1.5 * largest_mib,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="total checkpoint size (decimal GB)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--workdir", type=Path, help="where to build the checkpoint (default: the temp folder)")
    ap.add_argument("--out", type=Path, help="write the JSON result here")
    args = ap.parse_args()
    result = measure(args.size_gb, args.shards, args.workdir)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if result["claim_holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
