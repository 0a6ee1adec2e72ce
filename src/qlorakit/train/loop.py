"""The training loop: accumulation, autocast, schedule, clipping, eval, atomic checkpoints, exact resume."""

from __future__ import annotations

import logging
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.peft_format import lora_state_dict
from ..config import QloraConfig
from ..errors import QlorakitError
from .checkpoint import (RngStates, capture_rng, latest_checkpoint, load_checkpoint, optimizer_files,
                         save_checkpoint)
from .distributed import SINGLE_PROCESS, DistContext
from .forward import evaluate, forward_loss_sum
from .fsdp import grad_norm_value, set_gradient_sync
from .loss import count_targets
from .metrics import MetricsWriter, plot_losses
from .runtime import Runtime
from .schedule import lr_factor, warmup_steps_for

log = logging.getLogger("qlorakit.train")


class TrainingDivergedError(QlorakitError):
    """The loss became NaN or infinite."""


@dataclass
class LoopSettings:
    """What the loop needs, as plain values, taken from the one config schema (config.py) by from_config: no
    field has a default of its own, so no second set of defaults can drift from the config's."""

    output_dir: Path
    seed: int
    batch_size: int
    gradient_accumulation: int
    epochs: float
    max_steps: int | None
    learning_rate: float
    weight_decay: float
    scheduler: str
    warmup_ratio: float
    max_grad_norm: float | None
    max_seq_length: int
    packing: bool
    eval_every: int
    save_every: int
    log_every: int
    keep_checkpoints: int
    attn_implementation: str
    stop_after_steps: int | None = None  # stop (as if killed) after this many steps; for tests and demos
    run_settings: dict[str, Any] | None = None  # recorded in every checkpoint, compared on resume (run_state.py)

    @classmethod
    def from_config(cls, cfg: QloraConfig, stop_after_steps: int | None = None) -> LoopSettings:
        t = cfg.training
        return cls(
            output_dir=Path(t.output_dir), seed=t.seed, batch_size=t.batch_size,
            gradient_accumulation=t.gradient_accumulation, epochs=t.epochs, max_steps=t.max_steps,
            learning_rate=t.learning_rate, weight_decay=t.weight_decay, scheduler=t.scheduler,
            warmup_ratio=t.warmup_ratio, max_grad_norm=t.max_grad_norm, max_seq_length=t.max_seq_length,
            packing=cfg.data.packing, eval_every=t.eval_every, save_every=t.save_every, log_every=t.log_every,
            keep_checkpoints=t.keep_checkpoints, attn_implementation=cfg.model.attn_implementation,
            stop_after_steps=stop_after_steps)


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    losses: list[float] = field(default_factory=list)  # of the whole run, a resumed one's earlier steps included
    eval_history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    interrupted: bool = False
    checkpoint: Path | None = None


class _Cursor:
    """Position in the stream of micro-batches: (epoch, index into that epoch's batch plan)."""

    def __init__(self, plan_fn, epoch: int = 0, index: int = 0):
        self.plan_fn, self.epoch, self.index = plan_fn, epoch, index
        self.plan = plan_fn(epoch)

    def next(self) -> list[list[int]]:
        while self.index >= len(self.plan):
            self.epoch, self.index = self.epoch + 1, 0
            self.plan = self.plan_fn(self.epoch)
        batch = self.plan[self.index]
        self.index += 1
        return batch


def accumulate_gradients(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], runtime: Runtime,
                         packing: bool, attn_implementation: str, dist: DistContext = SINGLE_PROCESS,
                         before_backward: Callable[[int], None] | None = None) -> float:
    """Backpropagate one optimizer step's loss, adding to the parameters' .grad; return that loss.

    The loss is the mean over the target tokens of all micro-batches together: each micro-batch's summed loss
    is divided by the step's total target count, so the gradient does not depend on how the step's examples
    are split into micro-batches (batch 4 x accumulation 1 == batch 1 x accumulation 4). NaN and inf pass
    through to the caller. `before_backward(i)` is called before micro-batch i's backward (an optimizer that
    steps inside backward learns which micro-batch is the step's last).

    Data-parallel (`dist` enabled): `micro_batches` is the whole step on every rank; this rank forwards its
    share, and the trainable parameters' gradients and the loss are summed over ranks, so every rank returns the
    step's global loss with the step's full gradient in .grad.
    """
    n_targets = max(1, sum(count_targets(b["labels"]) for b in micro_batches))
    loss_sum = 0.0
    share = dist.my_share(micro_batches)
    for i, batch in enumerate(share):
        if dist.sharded:  # reduce-scatter once, after the rank's last micro-batch
            set_gradient_sync(model, i == len(share) - 1)
        part = forward_loss_sum(model, batch, runtime, packing, attn_implementation)
        if before_backward is not None:
            before_backward(i)
        (part / n_targets).backward()
        loss_sum += float(part.detach())
    if dist.enabled:
        dist.sum_gradients([p for p in model.parameters() if p.requires_grad])
        loss_sum = dist.sum_floats([loss_sum], runtime.device)[0]
    return loss_sum / n_targets


@dataclass(frozen=True)
class _ResumePoint:
    """Where the next optimizer step starts: its data position and RNG states. Checkpoints record this, so a
    step cut short by Ctrl-C is redone in full on resume rather than skipped."""

    epoch: int
    batch_index: int
    rng: RngStates


def planned_steps(train_examples, settings: LoopSettings) -> int:
    """The run's optimizer steps: max_steps, or epochs over the batch plan at gradient_accumulation."""
    from ..data import epoch_batches

    batches = len(epoch_batches(train_examples.lengths, settings.batch_size, settings.max_seq_length,
                                settings.packing, seed=settings.seed, epoch=0))
    if batches == 0:
        raise QlorakitError("no training batches: the training set is empty after filtering")
    return settings.max_steps or max(1, math.ceil(settings.epochs * batches / settings.gradient_accumulation))


def _divergence_message(step: int, loss: float, runtime: Runtime, settings: LoopSettings) -> str:
    """The causes that apply to this run only: fp16 overflow when computing in fp16, no clipping when off."""
    causes = []
    if runtime.compute_dtype == torch.float16:
        causes.append("fp16 compute overflowing (use bfloat16 where the GPU has it)")
    causes.append(f"a learning rate too high for this model (training.learning_rate is {settings.learning_rate:g})")
    if not settings.max_grad_norm:
        causes.append("no gradient clipping (set training.max_grad_norm, e.g. 0.3)")
    causes.append("bad data (a corrupt record)")
    return (f"loss became {loss} at step {step}: training stopped. Likely causes: {', '.join(causes[:-1])} or "
            f"{causes[-1]}. The last checkpoint is kept.")


def train_loop(
    model: nn.Module,
    train_examples,
    eval_examples,
    pad_id: int,
    settings: LoopSettings,
    runtime: Runtime,
    optimizer: torch.optim.Optimizer,
    *,
    adapter_record: dict[str, Any] | None = None,
    base_model_name: str | None = None,
    progress: bool = True,
    dist: DistContext = SINGLE_PROCESS,
    resume_from: Path | None = None,
) -> TrainResult:
    """Train the trainable parameters of `model` (LoRA adapters) on `train_examples`, continuing from the
    checkpoint `resume_from` when given (run_state.plan_resume chooses and checks it).

    Data-parallel (`dist` enabled): every rank runs this loop over the same plan with equal parameters (see
    distributed.py); only rank 0 writes metrics, checkpoints and the plot, the others wait for each checkpoint.
    Every rank resumes from the same checkpoint.
    """
    from ..data import epoch_batches

    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(adapter_record or {})

    def plan(epoch: int):
        return epoch_batches(train_examples.lengths, settings.batch_size, settings.max_seq_length,
                             settings.packing, seed=settings.seed, epoch=epoch)

    ga = settings.gradient_accumulation
    total_steps = planned_steps(train_examples, settings)
    warmup = warmup_steps_for(total_steps, settings.warmup_ratio)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", settings.learning_rate)

    step, cursor = 0, _Cursor(plan)
    resumed_from = 0
    ckpt = resume_from
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, rank=dist.rank,
                                sharded_world=dist.world_size if dist.sharded else None)
        if state.get("total_steps") != total_steps:
            log.warning("qlorakit: checkpoint %s planned %s steps, this run plans %s; continuing with %s",
                        ckpt, state.get("total_steps"), total_steps, total_steps)
        step = resumed_from = int(state["step"])
        cursor = _Cursor(plan, int(state["epoch"]), int(state["batch_index"]))
        log.info("qlorakit: resumed from %s (step %d of %d)", ckpt, step, total_steps)
    metrics: MetricsWriter | _NoMetrics = (MetricsWriter(out, resume_from_step=resumed_from) if dist.is_main
                                           else _NoMetrics())
    result = TrainResult(steps=step, total_steps=total_steps, resumed_from=resumed_from)
    # A resumed run's summary covers the whole run: the earlier steps' records come back from metrics.jsonl.
    result.losses = [r["loss"] for r in metrics.kept if r.get("event") == "train"]
    result.eval_history = [{k: v for k, v in r.items() if k != "event"} for r in metrics.kept
                           if r.get("event") == "eval"]
    params = [p for p in model.parameters() if p.requires_grad]

    def resume_point() -> _ResumePoint:
        return _ResumePoint(cursor.epoch, cursor.index, capture_rng())

    def checkpoint_now(wait_for_all: bool = True) -> Path:
        st = {"epoch": done.epoch, "batch_index": done.batch_index, "total_steps": total_steps,
              "settings": settings.run_settings or {}}
        path = out / "checkpoints" / f"step-{step:06d}"
        if dist.sharded and not wait_for_all:
            # Gathering the shards needs every rank, and after Ctrl-C the others may be stopped anywhere.
            log.warning("qlorakit: a sharded (fsdp) run cannot save on Ctrl-C; the last checkpoint is kept (stop "
                        "with SIGTERM to save the current step)")
            return latest_checkpoint(out) or path
        rngs = dist.gather_objects(done.rng) if wait_for_all and dist.enabled else [done.rng]
        adapter_tensors = optims = None
        if hasattr(optimizer, "master"):  # host_adamw_32bit: the fp32 master copies, not the GPU's compute dtype
            adapter_tensors = lora_state_dict(model, optimizer.master)
        if dist.sharded:
            adapter_tensors = lora_state_dict(model)
            optims = dist.gather_to_main(optimizer_files(optimizer))  # each rank's optimizer shard
        if dist.is_main:
            path = save_checkpoint(out, step, model, optimizer, st, record, base_model_name,
                                   settings.keep_checkpoints, rng=done.rng, other_ranks_rng=rngs[1:],
                                   adapter_tensors=adapter_tensors,
                                   other_ranks_optimizer=optims[1:] if optims is not None else None)
        if wait_for_all:  # no rank reads or prunes checkpoints while rank 0 writes one
            dist.barrier()
        return path

    stop_requested = {"flag": False}

    def on_sigterm(signum, frame):  # a scheduler's polite kill: finish the step, save, stop
        stop_requested["flag"] = True

    old_handler = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", disable=not progress or not dist.is_main,
               dynamic_ncols=True)
    say = bar.write if dist.is_main else _say_nothing  # tqdm.write prints even with the bar disabled
    model.train()
    if eval_examples is not None and step == 0:
        ev = evaluate(model, eval_examples, settings, runtime, pad_id, dist)
        ev["step"] = 0
        result.eval_history.append(ev)
        metrics.write({"event": "eval", **ev})
        say(f"step 0 (before training): eval loss {ev['eval_loss']:.4f}, perplexity {ev['eval_ppl']:.2f}")
    t_last, tokens_since = time.perf_counter(), 0
    done = resume_point()
    try:
        while step < total_steps:
            micro = [train_examples.collate(cursor.next(), pad_id) for _ in range(ga)]
            lr = settings.learning_rate * lr_factor(step, total_steps, warmup, settings.scheduler)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss = accumulate_gradients(model, micro, runtime, settings.packing, settings.attn_implementation,
                                        dist, getattr(optimizer, "begin_micro_batch", None))
            tokens_since += sum(int(b["attention_mask"].sum()) for b in micro)
            if not math.isfinite(loss):
                raise TrainingDivergedError(_divergence_message(step + 1, loss, runtime, settings))
            grad_norm = None
            if settings.max_grad_norm:
                grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            done = resume_point()
            result.losses.append(loss)
            now = time.perf_counter()
            tok_s = tokens_since / max(1e-9, now - t_last)
            if step % settings.log_every == 0 or step == total_steps:
                rec = {"event": "train", "step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_s,
                       "epoch": cursor.epoch + cursor.index / max(1, len(cursor.plan))}
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                mem = runtime.memory_gib()
                if mem is not None:
                    rec["peak_mem_gib"] = mem
                metrics.write(rec)
                t_last, tokens_since = now, 0
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}",
                                **({"mem": f"{mem:.1f}G"} if mem is not None else {}))
            bar.update(1)
            if eval_examples is not None and (step % settings.eval_every == 0 or step == total_steps):
                ev = evaluate(model, eval_examples, settings, runtime, pad_id, dist)
                ev["step"] = step
                result.eval_history.append(ev)
                metrics.write({"event": "eval", **ev})
                say(f"step {step}: eval loss {ev['eval_loss']:.4f}, perplexity {ev['eval_ppl']:.2f}")
            if step % settings.save_every == 0 or step == total_steps:  # the last step too: max_steps may grow
                result.checkpoint = checkpoint_now()
            stop = stop_requested["flag"] if not dist.enabled else dist.any(stop_requested["flag"], runtime.device)
            if stop or (settings.stop_after_steps and step >= settings.stop_after_steps):
                if result.checkpoint is None or result.checkpoint.name != f"step-{step:06d}":
                    result.checkpoint = checkpoint_now()
                result.interrupted = True
                break
    except KeyboardInterrupt:
        bar.close()
        result.interrupted = True
        if getattr(optimizer, "step_in_progress", False):
            # host_adamw_32bit steps inside backward: stopped there, some adapters hold step+1, others step.
            result.checkpoint = latest_checkpoint(out)
            log.warning("qlorakit: interrupted inside backward while the optimizer was stepping the adapters "
                        "(host_adamw_32bit), so step %d is half applied and is not saved; the newest checkpoint "
                        "is %s; run the same command to resume from it", step + 1,
                        result.checkpoint or "none (the run starts over)")
        else:
            # No barrier: the other ranks may be stopped anywhere (torchrun interrupts them all).
            result.checkpoint = checkpoint_now(wait_for_all=False)
            log.info("qlorakit: interrupted at step %d; checkpoint saved to %s; run the same command to resume",
                     step, result.checkpoint)
    finally:
        bar.close()
        metrics.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    result.steps = step
    if dist.is_main:
        plot_losses(metrics.path, out / "loss.png")
    return result


def _say_nothing(message: str) -> None:
    pass


class _NoMetrics:
    """The metrics writer of ranks other than 0: records are dropped (rank 0 writes the same global values)."""

    kept: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
