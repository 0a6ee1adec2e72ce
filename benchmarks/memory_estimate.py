"""How close `qlorakit estimate` comes to measured peaks: training steps of a random-init model built in NF4.

    python3 benchmarks/memory_estimate.py measure --shape llama3-8b --out DIR   # on a GPU: DIR/memory_estimate-SHAPE.json
    python3 benchmarks/memory_estimate.py compare DIR/memory_estimate-SHAPE.json  # anywhere: estimate vs measured

`measure` (needs CUDA): the Llama-3-8B or Llama-2-70B shape (model/synthetic.py), LoRA r=64 alpha=16 on all 7
linears, dropout 0.05, fp32 adapters, bf16 autocast, qlorakit's own accumulate_gradients + clip 0.3 + optimizer
step + zero_grad(set_to_none), as the training loop runs them, for each case of `cases()` (`--steps` steps each,
random tokens; a case that does not fit is reported as failed). Per case: torch's peak allocated and reserved
bytes, and NVML's used memory sampled every 2 ms, less what NVML showed before this process touched CUDA. Also the
CUDA context: NVML's used memory after CUDA start-up, a cuBLAS matmul and a Triton kernel, less torch's reserved
memory and the baseline.

`compare`: writes a config.json of the same shape, builds the same configs and prints estimate and measurement
side by side (qlorakit.memory.estimate; config.json only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

# As `qlorakit train` sets it (train/runtime.prefer_expandable_segments), before CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import NvmlPeak  # noqa: E402

# The grid the estimate is checked on: T in (512, 2048, 8192), B in (1, 4), and three activation policies:
#   keep      every layer's activations stay on the GPU (no checkpointing)
#   offload   every layer recomputed in backward, its input waiting in pinned host memory (the top one stays)
#   recompute every layer recomputed in backward, its input kept on the GPU
#   hosted    every layer's activations (without the gate/up output) in pinned host memory, nothing recomputed
#             (training.host_activations_gib; 8B shape, B1 and B4 only: run with --only to include it)
# plus, for the 8B shape, the optimizer / accumulation / packing variants below. Every case: r=64 on all linears,
# bf16, paged 32-bit Adam unless it says otherwise, data.packing false (random unpacked rows) unless it says so.
POLICIES = {"keep": {"gradient_checkpointing": False},
            "offload": {"gradient_checkpointing": True, "offload_activations": True},
            "recompute": {"gradient_checkpointing": True}}
HOSTED = {"gradient_checkpointing": True, "host_activations_gib": 4096.0}
VARIANTS: dict[str, dict] = {
    "4x2048-accum2-recompute": {"training": {"batch_size": 4, "max_seq_length": 2048, "gradient_accumulation": 2}},
    "1x8192-adamw8-packed-recompute": {"training": {"batch_size": 1, "max_seq_length": 8192,
                                                    "optimizer": "adamw_8bit"}, "data": {"packing": True}},
    "4x2048-offload32-keep4": {"training": {"batch_size": 4, "max_seq_length": 2048,
                                            "optimizer": "offload_adamw_32bit", "keep_activations_gib": 4.0}},
    "2x2048-accum2-adamw32-unfused": {"training": {"batch_size": 2, "max_seq_length": 2048,
                                                   "gradient_accumulation": 2, "optimizer": "adamw_32bit",
                                                   "fused_blocks": False}},
}


# The 70B-on-48-GB settings (README): the optimizer steps inside backward and turns the adapters into bf16, so
# these cases run last (measure() keeps one model for all cases).
LEAN = {"optimizer": "host_adamw_32bit", "max_grad_norm": None, "gradient_checkpointing": True,
        "offload_activations": True, "embeddings_on_host": True, "head_on_host": True, "stacked_dequant": False}


def cases(shape: str) -> dict[str, dict]:
    grid = {f"{b}x{t}-{name}": {"training": {"batch_size": b, "max_seq_length": t, **policy}}
            for t in (512, 2048, 8192) for b in (1, 4) for name, policy in POLICIES.items()}
    lean = {f"{b}x{t}-host-lean": {"training": {"batch_size": b, "max_seq_length": t, **LEAN}}
            for t, b in ((2048, 1), (8192, 1), (2048, 4))}
    hosted = {f"{b}x{t}-hosted": {"training": {"batch_size": b, "max_seq_length": t, **HOSTED}}
              for t in (512, 2048, 8192) for b in (1, 4)}
    return {**grid, **VARIANTS, **hosted, **lean} if shape == "llama3-8b" else {**grid, **hosted, **lean}


DEFAULTS = {"lora": {"rank": 64, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
            "training": {"optimizer": "paged_adamw_32bit", "gradient_checkpointing": True, "fused_blocks": True,
                         "keep_activations_gib": 0.0, "host_activations_gib": 0.0, "offload_activations": False,
                         "gradient_accumulation": 1,
                         "embeddings_on_host": False, "head_on_host": False, "stacked_dequant": True,
                         "max_grad_norm": 0.3},
            "data": {"packing": False}}


def case_tree(case: dict) -> dict:
    tree = {k: dict(v) for k, v in DEFAULTS.items()}
    for section, values in case.items():
        tree.setdefault(section, {}).update(values)
    return tree


def _batch(b: int, t: int, vocab: int, packed: bool):
    import torch

    ids = torch.randint(0, vocab, (b, t))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(t).expand(b, t).contiguous(),
             "attention_mask": torch.ones_like(ids)}
    if packed:  # two examples per row
        seg = torch.ones(b, t, dtype=torch.int32)
        seg[:, t // 2:] = 2
        batch["segment_ids"] = seg
        batch["position_ids"] = torch.cat([torch.arange(t // 2), torch.arange(t - t // 2)]).expand(b, t).contiguous()
    return batch


def measure(out: Path, steps: int, shape: str, only: list[str]) -> None:
    import pynvml
    import torch

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    baseline = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    from qlorakit.model.fused_blocks import disable_fused_blocks, enable_fused_blocks, keep_activations
    from qlorakit.model.lora_inject import enable_activation_checkpointing, inject_lora
    from qlorakit.kernels import set_workspace_limit
    from qlorakit.model.host_embedding import (move_embeddings_to_host, move_head_to_host, restore_embeddings,
                                               restore_head)
    from qlorakit.model.offload import decoder_layers, offload_layer_inputs, stop_offloading
    from qlorakit.model.offload_saved import host_saved_activations
    from qlorakit.model.synthetic import synthetic_llama
    from qlorakit.optim import build_optimizer
    from qlorakit.train.loop import accumulate_gradients
    from qlorakit.train.runtime import Runtime

    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
    from qlorakit import kernels

    kernels.call("rms_norm", x, torch.ones(1024, device="cuda", dtype=torch.bfloat16), 1e-5)
    torch.cuda.synchronize()
    context = pynvml.nvmlDeviceGetMemoryInfo(handle).used - baseline - torch.cuda.memory_reserved()
    del x
    model = synthetic_llama(shape, device="cuda")
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=64, alpha=16, dropout=0.05, adapter_dtype=torch.float32)
    model.train()
    runtime = Runtime(torch.device("cuda"), torch.bfloat16, torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = model.config.vocab_size
    record = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": shape,
              "nvml_baseline_bytes": baseline, "context_bytes": context,
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "cases": {}}
    print(f"context {context / 2**30:.3f} GiB (baseline {baseline / 2**30:.3f} GiB)", flush=True)
    every = cases(shape)
    unknown = [k for k in only if k not in every]
    if unknown:
        raise SystemExit(f"--only: no case {', '.join(unknown)} for {shape}; the cases: {', '.join(every)}")
    todo = {k: every[k] for k in only} if only else every  # in the order given, so the first ones surely run
    # host_adamw_32bit turns the adapters into bf16 for good: the lean cases after every other one.
    todo = dict(sorted(todo.items(), key=lambda kv: kv[1]["training"].get("optimizer") == "host_adamw_32bit"))
    for name, case in todo.items():
        t = case_tree(case)["training"]
        packed = case_tree(case)["data"]["packing"]
        disable_fused_blocks(model)
        if t["fused_blocks"]:
            enable_fused_blocks(model)
        if t["gradient_checkpointing"]:
            enable_activation_checkpointing(model)
            plan = keep_activations(model, t["batch_size"] * t["max_seq_length"],
                                    int(t["keep_activations_gib"] * 2**30), int(t["host_activations_gib"] * 2**30))
            host_saved_activations(model, list(plan.hosted_indices))
            if t["offload_activations"]:
                layers = decoder_layers(model)
                offload_layer_inputs(model, [i for i, x in enumerate(layers)
                                             if x.gradient_checkpointing and i not in plan.hosted_indices])
        else:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        if t["embeddings_on_host"]:
            move_embeddings_to_host(model)
        if t["head_on_host"]:
            move_head_to_host(model)
        set_workspace_limit(None if t["stacked_dequant"] else 0)
        opt = build_optimizer(t["optimizer"], params, lr=1e-5, weight_decay=0.0)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            with NvmlPeak(handle, every=0.002) as nv:
                for _ in range(steps):
                    micro = [_batch(t["batch_size"], t["max_seq_length"], vocab, packed)
                             for _ in range(t["gradient_accumulation"])]
                    accumulate_gradients(model, micro, runtime, packed, "sdpa",
                                         before_backward=getattr(opt, "begin_micro_batch", None))
                    if t["max_grad_norm"]:
                        torch.nn.utils.clip_grad_norm_(params, t["max_grad_norm"])
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
            rec = {"torch_peak_bytes": torch.cuda.max_memory_allocated(), "torch_reserved_bytes":
                   torch.cuda.max_memory_reserved(), "nvml_peak_bytes": nv.peak - baseline,
                   "optimizer_state_bytes": opt.state_bytes(), "seconds": round(time.perf_counter() - start, 1)}
        except Exception as err:  # noqa: BLE001 - a failed case is reported, the others still run
            rec = {"error": f"{type(err).__name__}: {err}"}
        record["cases"][name] = rec
        out.mkdir(parents=True, exist_ok=True)  # after every case, so a run stopped at its time limit keeps them
        (out / f"memory_estimate-{shape}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(name, {k: (round(v / 2**30, 3) if isinstance(v, int) else v) for k, v in rec.items()}, flush=True)
        if hasattr(opt, "remove_hooks"):  # host_adamw_32bit: its gradient hooks must not outlive it
            opt.remove_hooks()
        del opt
        stop_offloading(model)
        restore_embeddings(model)
        restore_head(model)
        for p in params:
            p.grad = None
        gc.collect()
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory_estimate-{shape}.json").write_text(json.dumps(record, indent=1) + "\n")


def compare(path: Path, markdown: Path | None = None) -> None:
    """Estimate beside measurement for every case of the record; NVML as a whole-card figure (the process's peak
    plus what the card showed before it started), as `qlorakit estimate`'s device peak means it. With `markdown`,
    the same table is also written there."""
    import tempfile

    from transformers import LlamaConfig

    from qlorakit.config import config_from_dict
    from qlorakit.memory import ModelShape
    from qlorakit.memory.estimate import estimate_shape
    from qlorakit.model.synthetic import SHAPES

    record = json.loads(path.read_text())
    gib = 2**30
    head = (f"{record['gpu']}, torch {record['torch']}, PYTORCH_CUDA_ALLOC_CONF={record.get('alloc_conf')}; "
            f"measured CUDA context {record['context_bytes'] / gib:.2f} GiB, card before start "
            f"{record['nvml_baseline_bytes'] / gib:.2f} GiB ({path.name})")
    rows = [("case", "torch est", "measured", "err", "device est", "NVML", "err", "reserved/alloc")]
    with tempfile.TemporaryDirectory() as tmp:
        LlamaConfig(**SHAPES[record["shape"]]).save_pretrained(tmp)
        shape = ModelShape(tmp)
        for name, m in record["cases"].items():
            if "error" in m:
                rows.append((name, "", "", "", "", "", "", m["error"].split(".")[0]))
                continue
            tree = case_tree(cases(record["shape"])[name])
            tree["model"] = {"name": tmp}
            est = estimate_shape(config_from_dict(tree), shape)
            tp, dp = m["torch_peak_bytes"], m["nvml_peak_bytes"] + record["nvml_baseline_bytes"]
            rows.append((name, f"{est.torch_peak / gib:.2f}", f"{tp / gib:.2f}", f"{est.torch_peak / tp - 1:+.1%}",
                         f"{est.device_peak / gib:.2f}", f"{dp / gib:.2f}", f"{est.device_peak / dp - 1:+.1%}",
                         f"{m['torch_reserved_bytes'] / tp:.3f}"))
    widths = [max(len(r[i]) for r in rows if len(r[i]) < 40) for i in range(len(rows[0]))]
    print(head)
    for r in rows:
        print(" ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if markdown is not None:
        lines = [head, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        markdown.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", default="benchmarks/results")
    m.add_argument("--steps", type=int, default=3)
    m.add_argument("--shape", default="llama3-8b", choices=("llama3-8b", "llama2-70b"))
    m.add_argument("--only", default="", help="comma-separated case names, run in that order (default: all of the "
                   "shape's)")
    c = sub.add_parser("compare")
    c.add_argument("path")
    c.add_argument("--markdown", type=Path, help="also write the table there")
    args = ap.parse_args()
    if args.cmd == "measure":
        measure(Path(args.out), args.steps, args.shape, [c for c in args.only.split(",") if c])
    else:
        compare(Path(args.path), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
