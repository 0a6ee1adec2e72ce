"""`qlorakit train`: from a validated config to a trained adapter, translating the config into plain arguments
for the layers below."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..atomic import write_text
from ..config import QloraConfig, dump_config
from ..data.readers import resolve_data_path
from ..errors import CheckpointWriteError, QloraConfigError, QlorakitError
from ..model.build import load_tokenizer, resolve_model_dir
from .checkpoint import remove_checkpoints, remove_leftovers, write_error_text
from .distributed import DistContext, check_batch_split, init_distributed, shutdown
from .loftq_setup import loftq_calibration, loftq_record
from .loop import LoopSettings, TrainResult, planned_steps, train_loop
from .placement import place_activations, place_tables
from .preference_setup import dropout_in_effect, prepare_pairs, start_from_adapter
from .preflight import say_if_type_worse_than_nf4
from .run_state import OutputLock, examples_fingerprint, plan_resume
from .runtime import DTYPES, Runtime, pick_runtime, seed_everything

log = logging.getLogger("qlorakit.train")


def build_model(cfg: QloraConfig, model_dir: Path, runtime: Runtime, progress: bool = True,
                fresh_adapters: bool = True, train_examples=None) -> nn.Module:
    """The 4-bit model with LoRA injected; `fresh_adapters` False (a resumed run, which loads its adapters and
    their starting weights from the checkpoint) skips lora.init loftq's SVDs, whose calibration tokens come from
    `train_examples` (the training split: never the held-out one)."""
    from ..model.loader import load_model
    from ..model.loftq_init import loftq_initialize, require_16bit_weights
    from ..model.lora_inject import inject_lora, keep_dense_copies_on_cpu, trainable_report

    q, loftq = cfg.quantization, cfg.lora.init == "loftq" and fresh_adapters
    if loftq:
        require_16bit_weights(model_dir)  # before loading: W is read again for the quantization error
    model, report = load_model(
        model_dir, load_in_4bit=q.load_in_4bit, quant_type=q.quant_type, blocksize=q.blocksize,
        double_quant=q.double_quant, compute_dtype=runtime.compute_dtype, device=runtime.device,
        attn_implementation=cfg.model.attn_implementation, trust_remote_code=cfg.model.trust_remote_code,
        progress=progress,
    )
    log.info("qlorakit: %s", report.line())
    lo = cfg.lora
    dropout = dropout_in_effect(cfg)
    names = inject_lora(model, lo.target_modules, r=lo.rank, alpha=lo.alpha, dropout=dropout,
                        use_rslora=lo.use_rslora, adapter_dtype=runtime.adapter_dtype)
    log.info("qlorakit: LoRA r=%d alpha=%g dropout %g%s on %d linears; %s", lo.rank, lo.alpha, dropout,
             f" (lora.dropout {lo.dropout} off: training.disable_dropout)" if dropout != lo.dropout else "",
             len(names), trainable_report(model))
    if loftq:
        loftq_initialize(model, model_dir, names, progress, loftq_calibration(cfg, train_examples))
    if runtime.device.type == "cpu":
        keep_dense_copies_on_cpu(model, runtime.compute_dtype, cfg.model.cpu_dense_copies)
    if cfg.training.fused_blocks:
        from ..model.fused_blocks import enable_fused_blocks

        enable_fused_blocks(model)
    return model


def build_optimizer(cfg: QloraConfig, model: nn.Module) -> torch.optim.Optimizer:
    from ..optim import build_optimizer as make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    name = cfg.training.optimizer
    optimizer = make_optimizer(name, params, lr=cfg.training.learning_rate,
                               weight_decay=cfg.training.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                               paged_prefetch=cfg.training.paged_prefetch,
                               compute_dtype=DTYPES[cfg.quantization.compute_dtype],
                               accumulation=cfg.training.gradient_accumulation)
    log.info("qlorakit: optimizer %s: %s", name, optimizer.describe())
    return optimizer


def run_settings(cfg: QloraConfig, data_fingerprint: str, base_fingerprint: str, world_size: int) -> dict:
    """What a checkpoint records of the run (run_state.py): `exact`, what decides the result; `free`, the rest."""
    t, q, lo, d = cfg.training, cfg.quantization, cfg.lora, cfg.data
    exact = {
        "base_fingerprint": base_fingerprint, "data_fingerprint": data_fingerprint,
        "quantization": f"{q.quant_type} blocksize {q.blocksize} double_quant {q.double_quant} "
                        f"compute {q.compute_dtype}",
        "lora": f"r {lo.rank} alpha {lo.alpha} dropout {dropout_in_effect(cfg)} rslora {lo.use_rslora} "
                f"dtype {lo.adapter_dtype} targets {lo.target_modules}"
                + (" init loftq" if lo.init == "loftq" else "")  # (absent for default, as in older checkpoints)
                + (f" calibration {lo.loftq_calibration} {lo.loftq_calibration_tokens}"  # (absent: plain, as before)
                   if lo.init == "loftq" and lo.loftq_calibration != "none" else ""),
        "seed": t.seed, "batch_size": t.batch_size, "gradient_accumulation": t.gradient_accumulation,
        "world_size": world_size, "optimizer": t.optimizer, "learning_rate": t.learning_rate,
        "weight_decay": t.weight_decay, "scheduler": t.scheduler, "warmup_ratio": t.warmup_ratio,
        "max_grad_norm": t.max_grad_norm, "max_seq_length": t.max_seq_length, "packing": d.packing,
        # (absent for sft, as in checkpoints written before preference objectives existed)
        **({"objective": f"{t.objective} beta {t.beta} gamma {t.simpo_gamma} smoothing {t.label_smoothing} "
                         f"reference {t.reference_adapter or 'the base'}"} if t.objective != "sft" else {}),
    }
    free = {"max_steps": t.max_steps, "epochs": t.epochs, "eval_every": t.eval_every, "save_every": t.save_every,
            "log_every": t.log_every, "keep_checkpoints": t.keep_checkpoints, "fused_blocks": t.fused_blocks,
            "gradient_checkpointing": t.gradient_checkpointing, "keep_activations_gib": t.keep_activations_gib,
            "host_activations_gib": t.host_activations_gib, "offload_activations": t.offload_activations}
    return {"exact": exact, "free": free}


@dataclass
class RunOutput:
    result: TrainResult
    adapter_dir: Path | None
    output_dir: Path
    model: nn.Module | None  # None when the run had already finished (nothing was loaded)
    tokenizer: object
    already_finished: bool = False


def run_training(cfg: QloraConfig, *, progress: bool = True, stop_after_steps: int | None = None,
                 device: str | None = None, before_training=None) -> RunOutput:
    """Load, quantize, inject LoRA, prepare data, train, save the adapter in PEFT format.

    Under torchrun (WORLD_SIZE > 1, training.distributed auto or ddp) this is one data-parallel rank: see
    distributed.py. Only rank 0 writes files; the returned output is the same on every rank.
    """
    from ..kernels import set_backend

    dist = init_distributed(mode=cfg.training.distributed)
    previous_backend = set_backend(cfg.model.kernels)  # chosen once for the run (QLORAKIT_KERNELS still wins)
    try:
        check_batch_split(cfg.training.gradient_accumulation, dist)
        if dist.enabled and cfg.training.optimizer == "host_adamw_32bit":
            raise QloraConfigError(f"training.optimizer host_adamw_32bit steps each adapter inside backward, before "
                                   f"gradients could be reduced over ranks: it runs in one process only (this is "
                                   f"{dist.world_size}); use paged_adamw_32bit or offload_adamw_32bit")
        if dist.enabled and device is None and torch.cuda.is_available():
            device = f"cuda:{dist.local_rank}"
        return _run_training(cfg, dist, progress=progress and dist.is_main, stop_after_steps=stop_after_steps,
                             device=device, before_training=before_training)
    finally:
        from ..kernels import set_workspace_limit

        set_backend(previous_backend)  # process-wide settings go back as they were (the workspace cap may have
        set_workspace_limit(None)  # been set by the memory plan, not the config)
        shutdown(dist)


def _run_training(cfg: QloraConfig, dist: DistContext, *, progress: bool, stop_after_steps: int | None,
                  device: str | None, before_training) -> RunOutput:
    t0 = time.perf_counter()
    seed_everything(cfg.training.seed)
    out = Path(cfg.training.output_dir)
    lock = _claim_output_dir(cfg) if dist.is_main else None
    try:
        return _train(cfg, dist, out, t0, progress=progress, stop_after_steps=stop_after_steps, device=device,
                      before_training=before_training)
    finally:
        if lock is not None:
            lock.release()


def _claim_output_dir(cfg: QloraConfig) -> OutputLock:
    """Check output_dir can be written, lock it for this run, and clear what killed checkpoint writes left."""
    from .preflight import check_output_dir

    out = Path(cfg.training.output_dir)
    check_output_dir(out)
    lock = OutputLock(out)
    removed = remove_leftovers(out)
    if removed:
        log.info("qlorakit: removed %d leftover(s) of interrupted writes in %s: %s", len(removed),
                 out, ", ".join(removed))
    if cfg.training.resume is False and (out / "checkpoints").is_dir():
        gone = remove_checkpoints(out)
        if gone:
            log.warning("qlorakit: training.resume is false: deleted the earlier run's checkpoints in %s (%s)",
                        out / "checkpoints", ", ".join(gone))
    return lock


def _plan_memory(cfg: QloraConfig, model_dir: Path, runtime: Runtime, several_ranks: bool = False):
    """Say the estimated peak; with training.memory_budget_gib, let the planner pick the activation plan (both
    before the model loads; a budget that nothing fits is refused here). On a GPU, a single-process run whose
    config names no budget and sets none of the planner's keys is planned for the card's free memory, less a
    margin (ranks could see different free memory and choose different micro-batches, so several ranks run as
    written). Returns (the config to run, the estimate, or None where the estimator cannot read the architecture)."""
    from ..memory import estimate, plan
    from ..memory.plan import PLANNED_KEYS, default_budget_gib

    budget = cfg.training.memory_budget_gib
    free = None
    if (budget is None and runtime.device.type == "cuda" and not several_ranks
            and not (cfg.training.model_fields_set & PLANNED_KEYS)):
        free = torch.cuda.mem_get_info(runtime.device)[0]
        budget = default_budget_gib(free)
    try:
        if budget is not None:
            try:
                chosen = plan(cfg, model_dir, budget, cuda=runtime.device.type == "cuda")
            except QloraConfigError as err:
                if free is None:
                    raise
                raise QloraConfigError(f"this GPU has {free / 2**30:.2f} GiB free, so the run may use "
                                       f"{budget:.2f} GiB (training.memory_budget_gib's default): {err}") from None
            log.info(chosen.line() + (f" (the default budget: {free / 2**30:.2f} GiB free on the GPU, less a "
                                      "margin; set training.memory_budget_gib, or any of the planned keys, to "
                                      "choose)" if free is not None else ""))
            return chosen.config, chosen.estimate
        est = estimate(cfg, model_dir)
    except QloraConfigError:
        raise
    except QlorakitError as err:  # an architecture the estimator cannot read; the model load names the problem
        log.info("qlorakit: no memory estimate for %s (%s)", model_dir, err)
        return cfg, None
    where = "on a CUDA device" if runtime.device.type != "cuda" else "device-wide"
    log.info("qlorakit: memory estimate: %.2f GiB torch peak, %.2f GiB %s (`qlorakit estimate` shows the "
             "breakdown)", est.torch_peak / 2**30, est.device_peak / 2**30, where)
    return cfg, est


def _check_disk(cfg: QloraConfig, est) -> None:
    """Refuse before loading the model when output_dir's disk cannot hold the run's checkpoints (sized from the
    estimate's exact adapter bytes)."""
    from ..optim.factory import OPTIMIZERS
    from .preflight import check_free_disk, run_output_bytes

    if est is None:
        return
    lo, t = cfg.lora, cfg.training
    adapter_bytes = 2 if lo.adapter_dtype in ("bfloat16", "float16") else 4
    params = est.component("lora_adapters") // adapter_bytes
    need = run_output_bytes(params, adapter_bytes, OPTIMIZERS[t.optimizer][0], t.keep_checkpoints)
    check_free_disk(Path(t.output_dir), need, f"{t.keep_checkpoints + 1} checkpoints and the adapter")


def _train(cfg: QloraConfig, dist: DistContext, out: Path, t0: float, *, progress: bool,
           stop_after_steps: int | None, device: str | None, before_training) -> RunOutput:
    from ..adapters.fingerprint import base_fingerprint
    from ..adapters.loftq import EXPORT_DIR, refresh_16bit_export
    from ..adapters.peft_format import lora_state_dict, peft_base_name, save_adapter
    from ..data import prepare_data

    model_dir = resolve_model_dir(cfg.model.name, cfg.model.revision)
    runtime = pick_runtime(cfg.quantization.compute_dtype, cfg.lora.adapter_dtype, device)
    if dist.is_main:
        q = cfg.quantization
        say_if_type_worse_than_nf4(model_dir, q.quant_type, q.blocksize, str(cfg.model.name))
    cfg, est = _plan_memory(cfg, model_dir, runtime, several_ranks=dist.enabled)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    d = cfg.data
    if not dist.is_main:  # rank 0 tokenises and fills the cache; the others then read it
        dist.barrier()
    token_cache = Path(d.cache_dir) if d.cache_dir else _default_token_cache()
    if cfg.training.objective != "sft":
        prepared = prepare_pairs(cfg, tokenizer, token_cache)
    else:
        prepared = prepare_data(
            resolve_data_path(d.path), tokenizer, fmt=d.format, max_seq_length=cfg.training.max_seq_length,
            template=d.template, train_on_inputs=d.train_on_inputs, overlong=d.overlong, text_field=d.text_field,
            messages_field=d.messages_field, eval_file=resolve_data_path(d.eval_file) if d.eval_file else None,
            eval_fraction=d.eval_fraction, max_eval_examples=d.max_eval_examples, seed=cfg.training.seed,
            cache_dir=token_cache,
        )
    if dist.is_main:
        dist.barrier()
    fingerprint = base_fingerprint(model_dir)
    settings = LoopSettings.from_config(cfg, stop_after_steps)
    settings.run_settings = run_settings(cfg, examples_fingerprint(prepared.train, prepared.eval), fingerprint,
                                         dist.world_size)
    total_steps = planned_steps(prepared.train, settings)
    t = cfg.training
    log.info("qlorakit: %d optimizer steps; effective batch %d (batch_size %d x gradient_accumulation %d), up to "
             "%d tokens a micro-batch; compute %s", total_steps, t.batch_size * t.gradient_accumulation,
             t.batch_size, t.gradient_accumulation, t.batch_size * t.max_seq_length, cfg.quantization.compute_dtype)
    resume = plan_resume(out, settings.run_settings, cfg.training.resume, total_steps)
    if resume.finished:
        log.info("qlorakit: %s already finished: step %d of %d; adapter: %s. To train longer raise "
                 "training.max_steps (it continues from the last checkpoint); to start over set training.resume: "
                 "false or another training.output_dir", out, resume.step, total_steps, out / "adapter")
        done = TrainResult(steps=resume.step, total_steps=total_steps, resumed_from=resume.step)
        return RunOutput(done, out / "adapter", out, None, tokenizer, already_finished=True)
    if dist.is_main:
        _check_disk(cfg, est)
        write_text(out / "config.yaml", dump_config(cfg))
    model = build_model(cfg, model_dir, runtime, progress, fresh_adapters=resume.checkpoint is None,
                        train_examples=prepared.train)
    if cfg.training.reference_adapter:
        start_from_adapter(cfg, model, fingerprint)
    place_activations(cfg, model, runtime, dist.sharded)
    if before_training is not None:
        before_training(model, tokenizer)
    place_tables(cfg, model, runtime)
    dist.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    if dist.sharded:
        from .fsdp import shard_model

        shard_model(model, runtime.device, dist.world_size)
    if dist.rank > 0:  # its own LoRA-dropout stream; rank 0 keeps the single-process one
        torch.manual_seed(cfg.training.seed + 1_000_003 * dist.rank)
    optimizer = build_optimizer(cfg, model)
    if cfg.training.reference_adapter:  # after the optimizer: the copy has the dtype the adapters train in
        from dataclasses import replace

        from ..nn.lora import adapter_snapshot

        settings.preference = replace(settings.preference, reference_adapter=adapter_snapshot(model))
    if cfg.training.precompute_ref_logps:
        from .reference_cache import with_reference_logps

        prepared = with_reference_logps(
            prepared, model, out, {"fingerprint": fingerprint, "quantization": cfg.quantization.model_dump(),
                                   "compute_dtype": runtime.compute_dtype}, cfg.training.batch_size, runtime,
            tokenizer.pad_token_id, settings.preference.reference_adapter, progress, dist)
    record = {
        "base_model": str(cfg.model.name),
        "base_model_dir": str(model_dir),
        "base_fingerprint": fingerprint,
        "quantization": cfg.quantization.model_dump(),
        "lora_init": cfg.lora.init,
        **({"loftq_calibration": loftq_record(cfg, prepared.train)} if cfg.lora.init == "loftq" else {}),
        "qlorakit_version": _version(),
    }
    result = train_loop(
        model, prepared.train, prepared.eval, tokenizer.pad_token_id, settings,
        runtime, optimizer, adapter_record=record, base_model_name=peft_base_name(str(cfg.model.name)),
        progress=progress, dist=dist, resume_from=resume.checkpoint,
    )
    if cfg.training.embeddings_on_host or cfg.training.head_on_host:  # generation (CUDA graphs) wants them back
        from ..model.host_embedding import restore_embeddings, restore_head

        restore_embeddings(model)
        restore_head(model)
    adapter_dir = None
    if not result.interrupted:
        adapter_dir = out / "adapter"
        # Sharded: every rank gathers the adapter (a collective), rank 0 writes it.
        tensors = lora_state_dict(model) if dist.sharded else None
        if hasattr(optimizer, "master"):  # host_adamw_32bit: save the fp32 master copies
            tensors = lora_state_dict(model, optimizer.master)
        if dist.is_main:  # the adapters are equal on every rank; one writes them
            record["training"] = {"steps": result.steps,
                                  "final_loss": result.losses[-1] if result.losses else None,
                                  "eval": result.eval_history[-1] if result.eval_history else None}
            try:
                adapter_dir = save_adapter(model, adapter_dir,
                                           base_model_name_or_path=peft_base_name(str(cfg.model.name)),
                                           qlorakit_record=record, tensors=tensors)
                refresh_16bit_export(adapter_dir, out / EXPORT_DIR)  # a loftq adapter's, for the 16-bit base
            except (OSError, SafetensorError) as err:
                raise CheckpointWriteError(
                    f"{adapter_dir}: writing the adapter failed ({write_error_text(err)}); the checkpoint of the last "
                    "step holds the same weights: fix that and run the same command to write it") from None
            summary = {"adapter": str(adapter_dir), "metrics": str(out / "metrics.jsonl"),
                       "loss_plot": str(out / "loss.png"), "steps": result.steps,
                       "seconds": round(time.perf_counter() - t0, 1), "eval": result.eval_history}
            write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        dist.barrier()
    return RunOutput(result, adapter_dir, out, model, tokenizer)


def _default_token_cache() -> Path:
    from ..assets import cache_dir

    return cache_dir() / "tokenized"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qlorakit")
    except PackageNotFoundError:
        return "unknown"
