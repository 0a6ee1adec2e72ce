"""DPO on the 4-bit base: qlorakit's preference step against TRL's DPOTrainer + PEFT + bitsandbytes, in one call.

    python3 benchmarks/dpo_step.py --out DIR [--pairs 1,4] [--seq 1024] [--prompt 256] [--keep 0,4]
                                   [--no-peer] [--budget-from-peer] [--adapter-dtype bfloat16] [--share on,off]
                                   [--shape llama3-8b] [--layers N] [--steps 8]

The setting of the [align] issue: Llama-3-8B shape (random init), LoRA r=64 alpha=16 on all 7 linears, pairs of a
chosen and a rejected sequence of --seq tokens each, sharing a --prompt-token prompt; DPO (sigmoid), beta 0.1,
the reference = the base with the adapter switched off (a fresh adapter on both sides), LoRA dropout off (TRL's
DPOTrainer disables dropout by default; qlorakit's side is built with dropout 0 to match), paged AdamW 32-bit,
lr 2e-4, clip 0.3.

1. The peer first, in its own process, before this process touches the GPU (so nothing of ours is resident
   beside it): benchmarks/peers.py trl-dpo, TRL's DPOTrainer given the 4-bit model and a LoraConfig (TRL's
   documented QLoRA route: it wraps the model, casts the adapters to bf16, runs the reference under
   disable_adapter, its fused chunked LM-head log-probs), bf16, non-reentrant gradient checkpointing. Timed by a
   callback around each optimizer step.
2. qlorakit: the model built directly in NF4 + double quantization (model/synthetic.py), --adapter-dtype adapters
   (lora.adapter_dtype: float32 by default, bfloat16 as TRL keeps them) under bf16 autocast, the fused block
   paths, checkpointing with --keep GiB of activations kept (training.keep_activations_gib; 0 = recompute every
   layer); with --budget-from-peer also what training.memory_budget_gib plans within the peer's peaks (kept,
   hosted and offloaded layers, embeddings on the host: settings_for()); per step one forward of the pairs for the
   reference without gradients and one for the policy (train/preference_step.py, the code `qlorakit train` runs),
   the log-probs from the fused linear + cross-entropy rows (no full-vocabulary logits). Each setting with
   --share's values of training.share_prompts: on, one row per pair, its prompt run once (train/shared_prompt.py:
   2 x --seq - --prompt tokens); off, TRL's layout (chosen rows, then rejected rows: 2 x --seq tokens).
3. For the memory target, qlorakit's SFT step on the same tokens (2 x pairs sequences of --seq tokens, loss on
   every token) with the same keep setting.

Per setting: the median step time after 3 warm-up steps (device synchronized around each step), pairs/s, torch's
peak allocated and the device-wide NVML peak (sampled every 5 ms). Targets (printed MET/MISS): qlorakit >= 2x the
peer's pairs/s at <= its torch and NVML peaks (the fastest qlorakit setting within both peaks, per pairs count);
qlorakit's DPO torch peak <= 1.15x its own SFT peak at the same tokens per step. JSON: OUT/dpo_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

USER_ALLOC_CONF = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")  # what the peer runs with
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `qlorakit train` sets it

import torch  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from bench_common import NvmlPeak, Run, place_activations, plan_within, sh  # noqa: E402

RATIO_TARGET = 2.0
DPO_OVER_SFT_TARGET = 1.15
WARMUP = 3
DEV = "cuda"  # --tiny: "cpu" (a harness check of this script without a GPU; its numbers mean nothing)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=512, num_hidden_layers=2, rms_norm_eps=1e-5)


def run_peer(args: argparse.Namespace, out: Path) -> dict:
    """peers.py trl-dpo in its own process (module docstring); its JSON entry, or {"error": ...}."""
    peer_out = out / "peers-raw"
    cmd = [sys.executable, str(BENCH / "peers.py"), "trl-dpo", "--shape", args.shape, "--batches",
           ",".join(f"{p}x{args.seq}" for p in args.pairs), "--prompt-tokens", str(args.prompt), "--steps",
           str(args.steps), "--rank", str(args.rank), "--dropout", "0", "--out", str(peer_out)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.tiny:
        cmd += ["--tiny", "--device", "cpu"]
    env = dict(os.environ)
    if USER_ALLOC_CONF is None:  # the peer with its default allocator, as its users run it
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    subprocess.run(cmd, check=False, env=env)
    path = peer_out / "peers.json"
    return json.loads(path.read_text()).get("trl-dpo", {}) if path.exists() else {"error": "no peers.json"}


def pair_batch(pairs: int, seq: int, prompt: int, vocab: int) -> dict[str, torch.Tensor]:
    """Random pairs as train/preference.py takes them: rows [chosen x pairs, rejected x pairs] of `seq` tokens, the
    first `prompt` shared by a pair's two rows; completion_mask marks the response tokens."""
    prompts = torch.randint(4, vocab, (pairs, prompt), device=DEV)
    responses = torch.randint(4, vocab, (2 * pairs, seq - prompt), device=DEV)
    ids = torch.cat([prompts.repeat(2, 1), responses], dim=1)
    completion = torch.zeros_like(ids)
    completion[:, prompt:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}


def timed(step, steps: int) -> tuple[float, int, float]:
    """Runs `step()` `steps` times; the median time after the warm-up, torch's peak and the NVML peak (GiB; 0 on
    the CPU)."""
    cuda = DEV == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with NvmlPeak() if cuda else contextlib.nullcontext() as nv:
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
    rest = sorted(times[WARMUP:] or times)
    if not cuda:
        return rest[len(rest) // 2], 0.0, 0.0
    return rest[len(rest) // 2], torch.cuda.max_memory_allocated() / 2**30, nv.peak / 2**30


def settings_for(args: argparse.Namespace, pairs: int, peer: dict, shared: bool) -> list[dict]:
    """The activation settings measured at `pairs`: each --keep value (recompute the rest), and with
    --budget-from-peer what training.memory_budget_gib plans within the peer's NVML peak, its torch peak less 2%
    as the second bound (benchmarks/train_step.py's rule), planned as the SFT step on the same tokens (DPO's peak
    measured 0.98-1.00x of it): 2 x pairs rows of --seq, or, with the prompts `shared`, pairs rows of 2 x --seq less
    --prompt."""
    out = [dict(name=f"keep{keep:g}", keep=keep, host=0.0, offload=False, embeddings=False, head=False,
                unstacked=False) for keep in args.keep]
    measured = peer.get(f"P{pairs}xT{args.seq}") or {}
    if args.budget_from_peer and DEV == "cuda" and "torch_peak_GiB" in measured:
        budget, torch_budget = measured["nvml_peak_GiB"], round(0.98 * measured["torch_peak_GiB"], 3)
        rows, seq = (pairs, 2 * args.seq - args.prompt) if shared else (2 * pairs, args.seq)
        plan = plan_within(args.shape, args.layers, rows, seq, budget, torch_budget, rank=args.rank,
                           dropout=0.0, optimizer="paged_adamw_32bit", adapter_dtype=args.adapter_dtype)
        t = plan.config.training
        print(plan.line(), flush=True)
        out.append(dict(name="plan", keep=t.keep_activations_gib, host=t.host_activations_gib,
                        offload=t.offload_activations, embeddings=t.embeddings_on_host, head=t.head_on_host,
                        unstacked=not t.stacked_dequant, budget_GiB=budget, torch_budget_GiB=torch_budget,
                        changes=plan.changes, estimate_torch_GiB=round(plan.estimate.torch_peak_gib, 3),
                        estimate_device_GiB=round(plan.estimate.device_peak_gib, 3)))
    elif args.budget_from_peer:
        print(f"--budget-from-peer: no peer result at P{pairs}xT{args.seq}: no plan measured", flush=True)
    return out


def ours(args: argparse.Namespace, peer: dict) -> dict:
    from qlorakit.kernels import set_workspace_limit
    from qlorakit.model.fused_blocks import enable_fused_blocks
    from qlorakit.model.host_embedding import move_embeddings_to_host, move_head_to_host, restore_embeddings, \
        restore_head
    from qlorakit.model.lora_inject import enable_activation_checkpointing, inject_lora
    from qlorakit.model.synthetic import synthetic_llama
    from qlorakit.optim import build_optimizer
    from qlorakit.train.loop import forward_loss_sum
    from qlorakit.train.preference import PreferenceSettings
    from qlorakit.train.preference_step import accumulate_preference
    from qlorakit.train.runtime import Runtime

    model = synthetic_llama(TINY if args.tiny else args.shape, layers=args.layers or None, device=DEV)
    weights = torch.cuda.memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    adapter_dtype = getattr(torch, args.adapter_dtype)
    inject_lora(model, "all-linear", r=args.rank, alpha=16, dropout=0.0, adapter_dtype=adapter_dtype)
    fused = enable_fused_blocks(model)
    enable_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer("paged_adamw_32bit", params, lr=2e-4, weight_decay=0.0)
    runtime = Runtime(torch.device(DEV), torch.bfloat16, adapter_dtype)
    vocab = model.config.vocab_size
    model.train()
    res: dict = {"weights_GiB": round(weights, 2), "fused": None if fused is None else fused.line(),
                 "trainable": sum(p.numel() for p in params), "optimizer": "paged_adamw_32bit", "lora_dropout": 0.0,
                 "adapter_dtype": f"{args.adapter_dtype} (bf16 autocast)"}

    def finish() -> None:
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for pairs, shared in ((p, s) for p in args.pairs for s in args.share):
        tokens = 2 * pairs * args.seq  # the pairs' tokens in TRL's layout (what tok/s counts)
        run_tokens = pairs * (2 * args.seq - args.prompt) if shared else tokens  # what the forward runs
        settings = PreferenceSettings("dpo", beta=0.1, share_prompts=shared)
        for setting in settings_for(args, pairs, peer, shared):
            plan, _ = place_activations(model, run_tokens, setting["keep"], setting["host"], setting["offload"])
            if setting["embeddings"]:
                move_embeddings_to_host(model)
            if setting["head"]:
                move_head_to_host(model)
            set_workspace_limit(0 if setting["unstacked"] else None)
            state: dict = {}

            def dpo_step() -> None:
                batch = pair_batch(pairs, args.seq, args.prompt, vocab)
                state["loss"], state["metrics"] = accumulate_preference(model, [batch], runtime, settings)
                finish()

            def sft_step() -> None:
                ids = torch.randint(0, vocab, (2 * pairs, args.seq), device=DEV)
                batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
                         "position_ids": torch.arange(args.seq, device=DEV).expand(2 * pairs, args.seq)}
                n = 2 * pairs * (args.seq - 1)
                (forward_loss_sum(model, batch, runtime, packing=False, attn_implementation="sdpa") / n).backward()
                finish()

            step, torch_peak, nvml_peak = timed(dpo_step, args.steps)
            sft_s, sft_torch, sft_nvml = timed(sft_step, args.steps)
            key = f"P{pairs}xT{args.seq}-{setting['name']}" + ("-shared" if shared else "")
            res[key] = dict(step_s=round(step, 4), pairs_per_s=round(pairs / step, 3), shared_prompts=shared,
                            run_tokens=run_tokens, tok_per_s=round(tokens / step, 1),
                            torch_peak_GiB=round(torch_peak, 2),
                            nvml_peak_GiB=round(nvml_peak, 2), kept_layers=plan.kept, hosted_layers=plan.hosted,
                            keep_activations_gib=setting["keep"], setting=setting, loss=round(state["loss"], 4),
                            sft=dict(step_s=round(sft_s, 4), tok_per_s=round(tokens / sft_s, 1),
                                     torch_peak_GiB=round(sft_torch, 2), nvml_peak_GiB=round(sft_nvml, 2)))
            print(f"qlorakit {key}: {res[key]}", flush=True)
            restore_embeddings(model)
            restore_head(model)
    set_workspace_limit(None)
    return res


def gib(value: float | None) -> str:
    return "n/a" if not value else f"{value:.2f}"


def judge(args: argparse.Namespace, peer: dict, mine: dict, run: Run) -> list[str]:
    """Targets and the table's lines (on the CPU, --tiny, no memory figures and so no targets)."""
    lines = [f"{'setting':28s} {'pairs/s':>8s} {'torch GiB':>10s} {'NVML GiB':>9s} {'SFT torch':>10s}"]
    for pairs in args.pairs:
        pk = peer.get(f"P{pairs}xT{args.seq}") or {}
        if "pairs_per_s" in pk:
            lines.append(f"{'trl-dpo P' + str(pairs):28s} {pk['pairs_per_s']:8.3f} {gib(pk['torch_peak_GiB']):>10s} "
                         f"{gib(pk['nvml_peak_GiB']):>9s}")
        rows = {k: v for k, v in mine.items() if k.startswith(f"P{pairs}xT{args.seq}-")}
        for k, v in rows.items():
            lines.append(f"{'qlorakit ' + k:28s} {v['pairs_per_s']:8.3f} {gib(v['torch_peak_GiB']):>10s} "
                         f"{gib(v['nvml_peak_GiB']):>9s} {gib(v['sft']['torch_peak_GiB']):>10s}")
            if DEV != "cuda":
                continue
            ratio = v["torch_peak_GiB"] / v["sft"]["torch_peak_GiB"]
            run.target(f"P{pairs} {k}: DPO torch peak <= {DPO_OVER_SFT_TARGET}x SFT's", ratio <= DPO_OVER_SFT_TARGET,
                       f"{v['torch_peak_GiB']:.2f} / {v['sft']['torch_peak_GiB']:.2f} = {ratio:.3f}")
        if DEV != "cuda":
            continue
        if "pairs_per_s" not in pk:
            run.target(f"P{pairs}: >= {RATIO_TARGET}x TRL's pairs/s within its peaks", False,
                       f"no peer result: {peer.get('error', 'missing')}")
            continue
        fits = [v for v in rows.values() if v["torch_peak_GiB"] <= pk["torch_peak_GiB"]
                and v["nvml_peak_GiB"] <= pk["nvml_peak_GiB"]]
        best = max(fits, key=lambda v: v["pairs_per_s"], default=None)
        if best is None:
            run.target(f"P{pairs}: >= {RATIO_TARGET}x TRL's pairs/s within its peaks", False,
                       "no qlorakit setting within the peer's torch and NVML peaks")
            continue
        ratio = best["pairs_per_s"] / pk["pairs_per_s"]
        run.target(f"P{pairs}: >= {RATIO_TARGET}x TRL's pairs/s within its peaks", ratio >= RATIO_TARGET,
                   f"{best['pairs_per_s']:.3f} / {pk['pairs_per_s']:.3f} = {ratio:.2f}x ({best['setting']['name']}: "
                   f"keep {best['keep_activations_gib']:g} GiB, host {best['setting']['host']:g} GiB; torch "
                   f"{best['torch_peak_GiB']} <= {pk['torch_peak_GiB']}, NVML {best['nvml_peak_GiB']} <= "
                   f"{pk['nvml_peak_GiB']})")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--pairs", default="1,4", help="pairs per step, comma-separated")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence (prompt + response)")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens of each sequence")
    ap.add_argument("--keep", default="0", help="training.keep_activations_gib values to measure, comma-separated")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--adapter-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="lora.adapter_dtype (TRL casts a 4-bit model's adapters to bfloat16)")
    ap.add_argument("--share", default="on,off", help="training.share_prompts values to measure: each pair's "
                    "prompt run once (on) or twice as TRL does (off), comma-separated")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-peer", action="store_true", help="qlorakit only")
    ap.add_argument("--budget-from-peer", action="store_true",
                    help="also measure what training.memory_budget_gib plans within the peer's peaks, per pairs count")
    ap.add_argument("--name", default="dpo_step", help="the JSON file's name (without .json)")
    ap.add_argument("--tiny", action="store_true", help="a toy model on the CPU: checks this script, times nothing")
    args = ap.parse_args()
    global DEV
    DEV = "cpu" if args.tiny else "cuda"
    args.pairs = [int(v) for v in args.pairs.split(",")]
    args.keep = [float(v) for v in args.keep.split(",")]
    if not set(args.share.split(",")) <= {"on", "off"}:
        ap.error("--share takes on, off or on,off")
    args.share = [v == "on" for v in args.share.split(",")]
    if not 0 < args.prompt < args.seq:
        ap.error("--prompt must be between 0 and --seq")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peer = {} if args.no_peer else run_peer(args, out)
    mine = ours(args, peer)
    run = Run()
    lines = judge(args, peer, mine, run)
    record = {"date": datetime.now(timezone.utc).isoformat(), "commit": sh("git", "rev-parse", "HEAD"),
              "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (--tiny)",
              "torch": torch.__version__, "args": vars(args),
              "peer": peer, "qlorakit": mine, "targets": run.targets}
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))
    for t in run.targets:
        print(f"{'MET ' if t['met'] else 'MISS'}  {t['name']}  {t['detail']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
