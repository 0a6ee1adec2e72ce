"""Quality on the default model and data, on the CPU: qlorakit's QLoRA variants against each other and against
transformers + PEFT + bitsandbytes.

    python benchmarks/quality.py [--config examples/quickstart.yaml] [--variants nf4,bnb-peft,...] [--steps 24]
                                 [--set lora.rank=64 --set lora.alpha=128 ...]
                                 [--out benchmarks/results/quality-cpu.json] [--workdir runs/quality]

Every variant trains the config (with the --set overrides) for --steps steps from the same seed, data, batches,
schedule and adapter initialisation, evaluating on the held-out examples before and after (the mean loss over
their response tokens). Only what the variant names differs:

- nf4, fp4: qlorakit QLoRA on a base quantized to NF4 / FP4 (blocksize and double quantization as configured);
- int4: qlorakit has no INT4 storage type. This variant loads the 16-bit base and replaces each weight that
  qlorakit would quantize (model/targets.py) by its absmax INT4 round trip (model/inspect_weights.int4_roundtrip:
  the 4-bit reference's blockwise absmax scaling at the config's blocksize, the nearest of the 15 levels k/7,
  times the fp32 absmax), rounded once to the compute dtype: what an INT4 layer that dequantizes and then
  multiplies computes. Its absmax constants stay fp32 (no double quantization), a small advantage over nf4/fp4;
- 16bit: plain LoRA on the unquantized base (in the compute dtype);
- loftq: nf4 with lora.init=loftq (calibrated as lora.loftq_calibration says, gram by default; to measure another
  calibration run --variants loftq alone with --set lora.loftq_calibration=..., which the config refuses for the
  variants without loftq). Where the config does not know lora.init, the variant is skipped and says so;
- bnb-peft: transformers + PEFT + bitsandbytes NF4 QLoRA set up in step with qlorakit's nf4 run (it needs that
  run, and runs right after it): the same NF4 bytes (checked), qlorakit's initial adapter copied by module name,
  qlorakit's batches, dropout generator state, optimizer and schedule; benchmarks/quality_peer.py says how.

Targets (printed last with MET or MISS, and in the JSON): qlorakit NF4's eval loss within 0.5% of bnb-peft's;
NF4 <= FP4 <= INT4 after training; LoftQ shrinks NF4's gap to 16-bit (eval loss ratio - 1) by at least 40%.
A target whose variants were not run is "not measured". Exit status 1 when a measured target is missed.

Output: the JSON at --out (date, commit, machine, versions, config, overrides, every variant's eval losses,
per-step training losses and seconds, the targets); the runs' folders under --workdir. Each variant takes
about 4 minutes on a 2-core CPU at the quickstart's size.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
# Run as a script, Python puts benchmarks/ first on sys.path, where kernels.py would shadow the `kernels` package
# that bitsandbytes looks for (see peers.py).
if sys.path and Path(sys.path[0] or ".").resolve() == BENCH:
    del sys.path[0]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from qlorakit.adapters.peft_format import lora_state_dict  # noqa: E402
from qlorakit.assets import cache_dir as token_cache_dir  # noqa: E402
from qlorakit.atomic import write_text  # noqa: E402
from qlorakit.config import QloraConfig, load_config  # noqa: E402
from qlorakit.errors import QloraConfigError  # noqa: E402
from qlorakit.model.build import load_tokenizer, resolve_model_dir  # noqa: E402
from qlorakit.model.inspect_weights import int4_roundtrip  # noqa: E402
from qlorakit.model.targets import target_linears_of  # noqa: E402
from qlorakit.nn.lora import LoraLinear  # noqa: E402
from qlorakit.train.run import run_training  # noqa: E402
from qlorakit.train.runtime import pick_runtime  # noqa: E402

FOUR_BIT = ["quantization.load_in_4bit=true"]
VARIANTS: dict[str, list[str]] = {  # name -> the overrides that make it (after --set, so they win)
    "nf4": [*FOUR_BIT, "quantization.quant_type=nf4"],
    "bnb-peft": [*FOUR_BIT, "quantization.quant_type=nf4"],
    "fp4": [*FOUR_BIT, "quantization.quant_type=fp4"],
    "int4": ["quantization.load_in_4bit=false"],
    "16bit": ["quantization.load_in_4bit=false"],
    "loftq": [*FOUR_BIT, "quantization.quant_type=nf4", "lora.init=loftq"],
}
PEER_TOLERANCE = 0.005
LOFTQ_GAP_SHRINK = 0.40
VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "qlorakit")


def load_peer_module():
    """benchmarks/quality_peer.py, loaded by path (benchmarks/ is not on sys.path, see above)."""
    spec = importlib.util.spec_from_file_location("quality_peer", BENCH / "quality_peer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def variant_config(args: argparse.Namespace, name: str) -> QloraConfig:
    run_dir = Path(args.workdir) / name
    control = [f"training.output_dir={run_dir}", f"training.max_steps={args.steps}",
               f"training.eval_every={args.steps}", f"training.save_every={args.steps}", "training.resume=false"]
    return load_config(args.config, [*args.set, *VARIANTS[name], *control])


def int4_base(model_dir: Path, blocksize: int) -> Callable[[nn.Module, Any], None]:
    """A before_training hook: each quantizable linear's 16-bit weight becomes its absmax INT4 round trip."""
    def replace(model: nn.Module, tokenizer: Any) -> None:
        with torch.no_grad():
            for name in target_linears_of(model_dir):
                layer = model.get_submodule(name)
                base = layer.base_layer if isinstance(layer, LoraLinear) else layer
                if type(base) is not nn.Linear:
                    raise TypeError(f"int4 variant: {name} is a {type(base).__name__}, not a 16-bit nn.Linear")
                base.weight.copy_(int4_roundtrip(base.weight, blocksize).to(base.weight.dtype))
    return replace


def capture_for_peer(captured: dict[str, Any]) -> Callable[[nn.Module, Any], None]:
    """A before_training hook: the adapter's initial tensors and the CPU generator state (the dropout stream's
    start; nothing draws from it between this hook and the first step) go into `captured`."""
    def capture(model: nn.Module, tokenizer: Any) -> None:
        captured["lora"] = {k: v.clone() for k, v in lora_state_dict(model).items()}  # CPU: views, not copies
        captured["rng"] = torch.get_rng_state()
    return capture


def qlorakit_row(out, seconds: float) -> dict[str, Any]:
    hist = out.result.eval_history
    return {"eval_before": hist[0]["eval_loss"], "eval_after": hist[-1]["eval_loss"],
            "eval_tokens": hist[-1]["eval_tokens"], "train_losses": out.result.losses, "seconds": seconds}


def run_variant(name: str, cfg: QloraConfig, captured: dict[str, Any] | None) -> dict[str, Any]:
    """Train one qlorakit variant; the nf4 run leaves in `captured`, when given, what the peer needs."""
    hook = None
    if name == "int4":
        hook = int4_base(resolve_model_dir(cfg.model.name, cfg.model.revision), cfg.quantization.blocksize)
    elif name == "nf4" and captured is not None:
        hook = capture_for_peer(captured)
    start = time.perf_counter()
    out = run_training(cfg, progress=False, device="cpu", before_training=hook)
    row = qlorakit_row(out, time.perf_counter() - start)
    if name == "nf4" and captured is not None:
        captured["model"], captured["run_dir"] = out.model, out.output_dir
    return row


def run_peer(args: argparse.Namespace, cfg: QloraConfig, captured: dict[str, Any]) -> dict[str, Any]:
    """bnb-peft, in step with the nf4 run whose model, initial adapter and generator state are in `captured`."""
    peer_lib = load_peer_module()
    model_dir = resolve_model_dir(cfg.model.name, cfg.model.revision)
    start = time.perf_counter()
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else token_cache_dir() / "tokenized"  # as train/run.py
    prepared = peer_lib.prepare_run_data(cfg, tokenizer, cache)
    fingerprint = peer_lib.check_same_data(prepared, captured["run_dir"])
    peer = peer_lib.load_peer(model_dir, cfg)
    weights = peer_lib.compare_4bit_weights(captured.pop("model"), peer)
    adapters = peer_lib.copy_lora_weights(captured["lora"], peer)
    runtime = pick_runtime(cfg.quantization.compute_dtype, cfg.lora.adapter_dtype, "cpu")
    run = peer_lib.train_peer(peer, prepared, cfg, runtime, tokenizer.pad_token_id, args.steps, captured["rng"])
    return {"eval_before": run.eval_history[0]["eval_loss"], "eval_after": run.eval_history[-1]["eval_loss"],
            "eval_tokens": run.eval_history[-1]["eval_tokens"], "train_losses": run.losses,
            "seconds": time.perf_counter() - start, "eval_after_bnb_cpu_bf16": run.eval_after_bnb_cpu_bf16,
            "alignment": {**weights, "adapter_tensors_copied": adapters, "data_fingerprint": fingerprint,
                          "dropout_generator": "qlorakit's CPU generator state before its first step",
                          "bnb_cpu_bf16_inference": "off for training and the eval losses (quality_peer.py)"}}


def compare_to_nf4(results: dict[str, dict[str, Any]]) -> None:
    """Add the step-by-step agreement of bnb-peft with nf4 to bnb-peft's row."""
    ours, peer = results["nf4"], results["bnb-peft"]
    rel = [abs(p / o - 1) for o, p in zip(ours["train_losses"], peer["train_losses"])]
    peer["vs_nf4"] = {"train_loss_max_rel_diff": max(rel, default=None), "train_loss_rel_diff": rel,
                      "eval_before_rel_diff": peer["eval_before"] / ours["eval_before"] - 1,
                      "eval_after_rel_diff": ours["eval_after"] / peer["eval_after"] - 1}


def targets(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each target: its value, and MET, MISS or 'not measured (needs ...)'."""
    after = {k: r["eval_after"] for k, r in results.items() if "eval_after" in r}

    def need(*names: str) -> str | None:
        missing = [n for n in names if n not in after]
        return f"not measured (needs {', '.join(missing)})" if missing else None

    out: dict[str, dict[str, Any]] = {}
    skip = need("nf4", "bnb-peft")
    ratio = None if skip else after["nf4"] / after["bnb-peft"] - 1
    out["nf4_within_0.5pct_of_bnb_peft"] = {
        "value": ratio, "status": skip or ("MET" if abs(ratio) <= PEER_TOLERANCE else "MISS"),
        "text": "qlorakit NF4 eval loss within 0.5% of transformers + PEFT + bitsandbytes NF4"
                + ("" if skip else f": {ratio:+.3%}")}
    skip = need("nf4", "fp4", "int4")
    order = None if skip else [after["nf4"], after["fp4"], after["int4"]]
    out["nf4_le_fp4_le_int4"] = {
        "value": order, "status": skip or ("MET" if order[0] <= order[1] <= order[2] else "MISS"),
        "text": "NF4 <= FP4 <= INT4 after training" + ("" if skip else ": " + " <= ".join(f"{v:.4f}" for v in order))}
    skip = need("nf4", "loftq", "16bit")
    shrink = None
    if not skip:
        gap_nf4, gap_loftq = after["nf4"] / after["16bit"] - 1, after["loftq"] / after["16bit"] - 1
        shrink = 1 - gap_loftq / gap_nf4 if gap_nf4 > 0 else None
        if shrink is None:
            skip = f"not measured (NF4 is not above 16-bit: gap {gap_nf4:+.3%})"
    out["loftq_shrinks_nf4_gap_40pct"] = {
        "value": shrink, "status": skip or ("MET" if shrink >= LOFTQ_GAP_SHRINK else "MISS"),
        "text": "LoftQ shrinks the NF4 / 16-bit eval loss gap by >= 40%"
                + ("" if shrink is None else f": by {shrink:.1%}")}
    return out


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    git = ["git", "-C", str(BENCH.parent)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    machine = {"arch": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "system": platform.platform()}
    return {"date": datetime.now(timezone.utc).isoformat(), "commit": commit, "uncommitted_changes": dirty,
            "machine": machine, "device": "cpu", "versions": versions}


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    base = results.get("16bit", {}).get("eval_after")
    lines = ["variant   eval before  eval after  / 16-bit  last train loss  seconds"]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"{name:8s}  skipped: {r['skipped']}")
            continue
        ratio = f"{r['eval_after'] / base:.4f}" if base else "   -  "
        lines.append(f"{name:8s}  {r['eval_before']:.4f}       {r['eval_after']:.4f}      {ratio}    "
                     f"{r['train_losses'][-1]:.4f}           {r['seconds']:.0f}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/quickstart.yaml")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every variant, e.g. --set lora.rank=64 (repeatable)")
    ap.add_argument("--out", default="benchmarks/results/quality-cpu.json", help="the JSON file to write")
    ap.add_argument("--workdir", default="runs/quality", help="where the variants' run folders go")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        ap.error(f"--variants {args.variants!r}: unknown {', '.join(unknown) or 'empty'}; allowed: "
                 f"{', '.join(VARIANTS)}")
    if args.steps <= 0:
        ap.error(f"--steps {args.steps}: must be positive")
    if "bnb-peft" in names and "nf4" not in names:
        print("bnb-peft trains in step with qlorakit's nf4 run: adding nf4", flush=True)
        names.append("nf4")
    args.names = [n for n in VARIANTS if n in names]  # nf4 before bnb-peft
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    captured: dict[str, Any] = {}
    started = time.perf_counter()
    for name in args.names:
        try:
            cfg = variant_config(args, name)
        except QloraConfigError as err:
            if name != "loftq":
                raise
            results[name] = {"skipped": f"the config refuses lora.init=loftq on this branch ({err})"}
            print(f"{name}: skipped: {results[name]['skipped']}", flush=True)
            continue
        if name == "bnb-peft":
            results[name] = run_peer(args, cfg, captured)
        else:
            results[name] = run_variant(name, cfg, captured if "bnb-peft" in args.names else None)
        results[name]["overrides"] = VARIANTS[name]
        r = results[name]
        print(f"{name}: eval loss {r['eval_before']:.4f} -> {r['eval_after']:.4f} ({r['seconds']:.0f} s)", flush=True)
    if "bnb-peft" in results:
        compare_to_nf4(results)
    verdict = targets(results)
    record = {**environment(), "config": args.config, "overrides": args.set, "steps": args.steps,
              "seconds": time.perf_counter() - started, "results": results, "targets": verdict,
              "notes": {"int4": "16-bit base whose quantizable linear weights are their absmax INT4 round trip "
                                "(model/inspect_weights.int4_roundtrip, the config's blocksize, fp32 absmax, no "
                                "double quantization): what an INT4 layer that dequantizes then multiplies computes",
                        "bnb-peft": "benchmarks/quality_peer.py: same NF4 bytes (checked), qlorakit's initial "
                                    "adapter by module name, qlorakit's batches and dropout generator state, "
                                    "qlorakit's optimizer (AdamW, 32-bit states) and schedule applied to PEFT's "
                                    "parameters, the config's compute dtype on both sides",
                        "eval": "mean token loss over the held-out examples' response tokens"}}
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_text(dest, json.dumps(record, indent=2) + "\n")
    print(f"\nwritten {dest}")
    print("\n".join(table(results)))
    for t in verdict.values():
        measured = t["status"] in ("MET", "MISS")
        print(f"{t['status'] if measured else '-':4s}  {t['text']}" + ("" if measured else f": {t['status']}"))
    return 1 if any(t["status"] == "MISS" for t in verdict.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
