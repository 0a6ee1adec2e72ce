"""The `qlorakit train` command: train, then say where everything is; optionally show replies before/after."""

from __future__ import annotations

import logging
import sys
import time

from ..config import QloraConfig
from .run import run_training

log = logging.getLogger("qlorakit.train")


def _show(model, tokenizer, prompts: list[str], title: str, max_new_tokens: int, repetition_penalty: float) -> None:
    """Greedy replies to `prompts`, with the same repetition penalty before and after training so they compare."""
    from ..infer.generate import generate

    how = "greedy" if repetition_penalty == 1.0 else f"greedy, repetition penalty {repetition_penalty:g}"
    print(f"\n=== {title}; {how} ===", flush=True)
    for prompt in prompts:
        print(f">>> {prompt}", flush=True)
        generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                 stream=sys.stdout)
        print("\n", flush=True)


def train_command(cfg: QloraConfig, *, prompts: list[str], max_new_tokens: int = 96, repetition_penalty: float = 1.0,
                  progress: bool = True) -> int:
    from .distributed import torchrun_env

    t0 = time.perf_counter()
    env = torchrun_env()
    if env is not None and env.rank != 0:  # under torchrun only rank 0 talks to the user
        prompts = []
        progress = False
    if prompts and env is not None and env.world_size > 1 and cfg.training.distributed == "fsdp":
        log.warning("qlorakit: sample replies are not generated in a sharded (fsdp) run (rank 0 alone cannot "
                    "run a sharded model); after training: qlorakit generate --model %s --adapter %s/adapter",
                    cfg.model.name, cfg.training.output_dir)
        prompts = []
    before = None
    if prompts:
        def before(model, tok):
            start = cfg.training.reference_adapter  # the adapter training continues from, if any
            _show(model, tok, prompts, f"before training ({f'base + {start}' if start else 'base model'})",
                  max_new_tokens, repetition_penalty)
    out = run_training(cfg, progress=progress, before_training=before)
    if env is not None and env.rank != 0:
        return 130 if out.result.interrupted else 0
    if out.already_finished:
        print(f"{out.output_dir}: this run already finished ({out.result.steps} of {out.result.total_steps} steps); "
              f"adapter: {out.adapter_dir}. Raise training.max_steps to train longer, or set another "
              "training.output_dir for a new run.")
        return 0
    if out.result.interrupted:
        print(f"stopped at step {out.result.steps}; checkpoint: {out.result.checkpoint}. "
              "Run the same command to resume.")
        return 130
    if prompts:
        _show(out.model, out.tokenizer, prompts, "after training (base + adapter)", max_new_tokens, repetition_penalty)
    hist = out.result.eval_history
    if hist:
        first, last = hist[0], hist[-1]
        if "eval_rewards/accuracies" in last:  # a preference objective: how often the chosen reply wins
            then = (f"rewards/accuracies {first['eval_rewards/accuracies']:.3f} -> "
                    f"{last['eval_rewards/accuracies']:.3f}; margins {first['eval_rewards/margins']:.4f} -> "
                    f"{last['eval_rewards/margins']:.4f} (held-out pairs)")
        else:
            then = f"perplexity {first['eval_ppl']:.2f} -> {last['eval_ppl']:.2f}"
        print(f"eval loss {first['eval_loss']:.4f} (step {first['step']}) -> {last['eval_loss']:.4f} "
              f"(step {last['step']}); {then}")
    print(f"adapter:  {out.adapter_dir}")
    print(f"metrics:  {out.output_dir / 'metrics.jsonl'}")
    print(f"plot:     {out.output_dir / 'loss.png'}")
    print(f"took {time.perf_counter() - t0:.0f} s")
    return 0
