"""The training loop: accumulation, autocast, schedule, clipping, eval, atomic checkpoints, exact resume."""

from __future__ import annotations

import logging
import math
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
from .metrics import MetricsWriter, NoMetrics, plot_losses
from .preference import PreferenceSettings
from .preference_step import accumulate_preference, evaluate_preference
from .runtime import Runtime
from .schedule import lr_factor, warmup_steps_for
from .steps import Cursor as _Cursor
from .steps import planned_steps

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
    preference: PreferenceSettings | None  # training.objective other than sft: its loss settings
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
            packing=cfg.data.packing and t.objective == "sft",  # preference pairs are never packed
            eval_every=t.eval_every, save_every=t.save_every, log_every=t.log_every,
            keep_checkpoints=t.keep_checkpoints, attn_implementation=cfg.model.attn_implementation,
            preference=None if t.objective == "sft" else PreferenceSettings(
                t.objective, t.beta, t.label_smoothing, t.simpo_gamma, share_prompts=t.share_prompts),
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
    Every rank resumes from the same checkpoint. The steps of a run are the methods of _Trainer, in order.
    """
    trainer = _Trainer(model, train_examples, eval_examples, pad_id, settings, runtime, optimizer,
                       record=dict(adapter_record or {}), base_model_name=base_model_name, dist=dist)
    trainer.resume(resume_from)
    return trainer.run(progress)


class _Trainer:
    """One training run, as named steps: resume, run (evaluate before training, then per step: train_step,
    log_step, evaluate, checkpoint, stop?), and what an interrupt does (interrupted)."""

    def __init__(self, model: nn.Module, train_examples, eval_examples, pad_id: int, settings: LoopSettings,
                 runtime: Runtime, optimizer: torch.optim.Optimizer, *, record: dict[str, Any],
                 base_model_name: str | None, dist: DistContext):
        from ..data import epoch_batches

        self.model, self.train_examples, self.eval_examples, self.pad_id = model, train_examples, eval_examples, pad_id
        self.settings, self.runtime, self.optimizer, self.dist = settings, runtime, optimizer, dist
        self.record, self.base_model_name = record, base_model_name
        self.out = Path(settings.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.plan = lambda epoch: epoch_batches(train_examples.lengths, settings.batch_size, settings.max_seq_length,
                                                settings.packing, seed=settings.seed, epoch=epoch)
        self.total_steps = planned_steps(train_examples, settings)
        self.warmup = warmup_steps_for(self.total_steps, settings.warmup_ratio)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", settings.learning_rate)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step, self.resumed_from, self.cursor = 0, 0, _Cursor(self.plan)
        self.stop_requested = False
        self.pair_metrics: dict[str, float] = {}  # the last step's, for a preference objective
        self.say: Callable[[str], None] = _say_nothing

    # -- before the first step ------------------------------------------------------------------------------------

    def resume(self, ckpt: Path | None) -> None:
        """Load the checkpoint (adapter, optimizer, RNG, data position) when there is one; open the metrics, whose
        earlier records a resumed run's summary includes."""
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer, rank=self.dist.rank,
                                    sharded_world=self.dist.world_size if self.dist.sharded else None)
            if state.get("total_steps") != self.total_steps:
                log.warning("qlorakit: checkpoint %s planned %s steps, this run plans %s; continuing with %s",
                            ckpt, state.get("total_steps"), self.total_steps, self.total_steps)
            self.step = self.resumed_from = int(state["step"])
            self.cursor = _Cursor(self.plan, int(state["epoch"]), int(state["batch_index"]))
            log.info("qlorakit: resumed from %s (step %d of %d)", ckpt, self.step, self.total_steps)
        self.metrics: MetricsWriter | NoMetrics = (MetricsWriter(self.out, resume_from_step=self.resumed_from)
                                                    if self.dist.is_main else NoMetrics())
        self.result = TrainResult(steps=self.step, total_steps=self.total_steps, resumed_from=self.resumed_from)
        self.result.losses = [r["loss"] for r in self.metrics.kept if r.get("event") == "train"]
        self.result.eval_history = [{k: v for k, v in r.items() if k != "event"} for r in self.metrics.kept
                                    if r.get("event") == "eval"]

    # -- the steps ------------------------------------------------------------------------------------------------

    def resume_point(self) -> _ResumePoint:
        return _ResumePoint(self.cursor.epoch, self.cursor.index, capture_rng())

    def train_step(self) -> tuple[float, float, float | None, int]:
        """One optimizer step: (loss, learning rate, gradient norm or None, tokens)."""
        s = self.settings
        micro = [self.train_examples.collate(self.cursor.next(), self.pad_id) for _ in range(s.gradient_accumulation)]
        lr = s.learning_rate * lr_factor(self.step, self.total_steps, self.warmup, s.scheduler)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        hook = getattr(self.optimizer, "begin_micro_batch", None)
        if s.preference is not None:
            loss, self.pair_metrics = accumulate_preference(self.model, micro, self.runtime, s.preference, self.dist,
                                                            hook)
        else:
            loss = accumulate_gradients(self.model, micro, self.runtime, s.packing, s.attn_implementation,
                                        self.dist, hook)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        if not math.isfinite(loss):
            raise TrainingDivergedError(_divergence_message(self.step + 1, loss, self.runtime, s))
        grad_norm = None
        if s.max_grad_norm:
            grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.done = self.resume_point()
        self.result.losses.append(loss)
        return loss, lr, grad_norm, tokens

    def log_step(self, loss: float, lr: float, grad_norm: float | None, tok_s: float) -> None:
        rec = {"event": "train", "step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tok_s,
               "epoch": self.cursor.epoch + self.cursor.index / max(1, len(self.cursor.plan))}
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        rec.update(self.pair_metrics)  # a preference objective's rewards/... (TRL's names)
        mem = self.runtime.memory_gib()
        if mem is not None:
            rec["peak_mem_gib"] = mem
        self.metrics.write(rec)
        pairs = {"acc": f"{rec['rewards/accuracies']:.2f}", "margin": f"{rec['rewards/margins']:.3f}"} \
            if "rewards/margins" in rec else {}
        self.bar.set_postfix(loss=f"{loss:.4f}", **pairs, tok_s=f"{tok_s:,.0f}",
                             **({"mem": f"{mem:.1f}G"} if mem is not None else {}))

    def evaluate(self) -> None:
        s = self.settings
        if s.preference is not None:
            ev = evaluate_preference(self.model, self.eval_examples, s.batch_size, s.max_seq_length, s.seed,
                                     self.runtime, self.pad_id, s.preference)
        else:
            ev = evaluate(self.model, self.eval_examples, s, self.runtime, self.pad_id, self.dist)
        ev["step"] = self.step
        self.result.eval_history.append(ev)
        self.metrics.write({"event": "eval", **ev})
        when = "step 0 (before training)" if self.step == 0 else f"step {self.step}"
        what = (f"rewards/accuracies {ev['eval_rewards/accuracies']:.3f}, margins {ev['eval_rewards/margins']:.4f}"
                if s.preference is not None else f"perplexity {ev['eval_ppl']:.2f}")
        self.say(f"{when}: eval loss {ev['eval_loss']:.4f}, {what}")

    def checkpoint(self, wait_for_all: bool = True) -> Path:
        """Save the state after the last complete step (self.done): every rank gathers, rank 0 writes."""
        st = {"epoch": self.done.epoch, "batch_index": self.done.batch_index, "total_steps": self.total_steps,
              "settings": self.settings.run_settings or {}}
        path = self.out / "checkpoints" / f"step-{self.step:06d}"
        dist, optimizer = self.dist, self.optimizer
        if dist.sharded and not wait_for_all:
            # Gathering the shards needs every rank, and after Ctrl-C the others may be stopped anywhere.
            log.warning("qlorakit: a sharded (fsdp) run cannot save on Ctrl-C; the last checkpoint is kept (stop "
                        "with SIGTERM to save the current step)")
            return latest_checkpoint(self.out) or path
        rngs = dist.gather_objects(self.done.rng) if wait_for_all and dist.enabled else [self.done.rng]
        adapter_tensors = optims = None
        if hasattr(optimizer, "master"):  # host_adamw_32bit: the fp32 master copies, not the GPU's compute dtype
            adapter_tensors = lora_state_dict(self.model, optimizer.master)
        if dist.sharded:
            adapter_tensors = lora_state_dict(self.model)
            optims = dist.gather_to_main(optimizer_files(optimizer))  # each rank's optimizer shard
        if dist.is_main:
            path = save_checkpoint(self.out, self.step, self.model, optimizer, st, self.record, self.base_model_name,
                                   self.settings.keep_checkpoints, rng=self.done.rng, other_ranks_rng=rngs[1:],
                                   adapter_tensors=adapter_tensors,
                                   other_ranks_optimizer=optims[1:] if optims is not None else None)
        if wait_for_all:  # no rank reads or prunes checkpoints while rank 0 writes one
            dist.barrier()
        return path

    def should_stop(self) -> bool:
        """SIGTERM (on any rank) or stop_after_steps reached."""
        stop = (self.stop_requested if not self.dist.enabled
                else self.dist.any(self.stop_requested, self.runtime.device))
        return stop or bool(self.settings.stop_after_steps and self.step >= self.settings.stop_after_steps)

    def interrupted(self) -> None:
        """Ctrl-C: save the last complete step, unless an optimizer stepping inside backward was cut halfway."""
        self.bar.close()
        self.result.interrupted = True
        if getattr(self.optimizer, "step_in_progress", False):
            # host_adamw_32bit steps inside backward: stopped there, some adapters hold step+1, others step.
            self.result.checkpoint = latest_checkpoint(self.out)
            log.warning("qlorakit: interrupted inside backward while the optimizer was stepping the adapters "
                        "(host_adamw_32bit), so step %d is half applied and is not saved; the newest checkpoint "
                        "is %s; run the same command to resume from it", self.step + 1,
                        self.result.checkpoint or "none (the run starts over)")
        else:
            # No barrier: the other ranks may be stopped anywhere (torchrun interrupts them all).
            self.result.checkpoint = self.checkpoint(wait_for_all=False)
            log.info("qlorakit: interrupted at step %d; checkpoint saved to %s; run the same command to resume",
                     self.step, self.result.checkpoint)

    # -- the run --------------------------------------------------------------------------------------------------

    def run(self, progress: bool) -> TrainResult:
        s, result = self.settings, self.result

        def on_sigterm(signum, frame):  # a scheduler's polite kill: finish the step, save, stop
            self.stop_requested = True

        old_handler = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                        disable=not progress or not self.dist.is_main, dynamic_ncols=True)
        self.say = self.bar.write if self.dist.is_main else _say_nothing  # tqdm.write prints even when disabled
        self.model.train()
        if self.eval_examples is not None and self.step == 0:
            self.evaluate()
        t_last, tokens_since = time.perf_counter(), 0
        self.done = self.resume_point()
        try:
            while self.step < self.total_steps:
                loss, lr, grad_norm, tokens = self.train_step()
                tokens_since += tokens
                now = time.perf_counter()
                if self.step % s.log_every == 0 or self.step == self.total_steps:
                    self.log_step(loss, lr, grad_norm, tokens_since / max(1e-9, now - t_last))
                    t_last, tokens_since = now, 0
                self.bar.update(1)
                if self.eval_examples is not None and (self.step % s.eval_every == 0
                                                       or self.step == self.total_steps):
                    self.evaluate()
                if self.step % s.save_every == 0 or self.step == self.total_steps:  # the last: max_steps may grow
                    result.checkpoint = self.checkpoint()
                if self.should_stop():
                    if result.checkpoint is None or result.checkpoint.name != f"step-{self.step:06d}":
                        result.checkpoint = self.checkpoint()
                    result.interrupted = True
                    break
        except KeyboardInterrupt:
            self.interrupted()
        finally:
            self.bar.close()
            self.metrics.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        result.steps = self.step
        if self.dist.is_main:
            plot_losses(self.metrics.path, self.out / "loss.png")
        return result


def _say_nothing(message: str) -> None:
    pass


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
