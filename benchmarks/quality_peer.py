"""The bnb-peft peer of benchmarks/quality.py: transformers + PEFT + bitsandbytes NF4 QLoRA, trained in step with
qlorakit's NF4 run so that the two differ only in the code that computes the model.

What is the same, and how it is made so:

- base weights: transformers loads the model folder with BitsAndBytesConfig(load_in_4bit, NF4, double quant,
  compute dtype = quantization.compute_dtype) and dtype = compute dtype; bitsandbytes' CPU path quantizes them.
  `compare_4bit_weights` checks every 4-bit linear against qlorakit's: the packed bytes and the dequantized
  weights (bitsandbytes' dequantize_4bit against qlorakit's dequantize, both in fp32) must be identical;
- compute dtype: the config's, on both sides (the quickstart's float32: both dequantize to fp32 and multiply in
  fp32, qlorakit from its dense CPU copy, bitsandbytes by dequantizing on every call); another dtype runs the
  peer's step under the same autocast that qlorakit's loop uses, but prepare_model_for_kbit_training then keeps
  the norms and embeddings in fp32 where qlorakit keeps them in the compute dtype: only float32 is exact.
  One CPU path of bitsandbytes (0.50) differs: on a CPU with AVX512-BF16, a Linear4bit in eval mode without
  gradients repacks its weight for a CPU kernel, with the absmax rounded to bf16 and the product in bf16, and
  keeps the repacked weight; training forwards then go through an operation without autograd, so no gradient
  flows back through its 4-bit layers (seen on the tiny test model: after one evaluation only the o_proj and
  down_proj adapters, which add to the residual stream, still got gradients). `set_cpu_bf16_inference(peer,
  False)` clears the layers' own switch for that path (`support_avx512bf16_for_cpu`), so the peer evaluates and
  trains through the dequantize-to-compute-dtype path, as qlorakit does; after training, one more evaluation
  with the switch back measures bitsandbytes' own CPU inference path, for information (`eval_after_bnb_cpu_bf16`);
- PEFT set-up: prepare_model_for_kbit_training (with training.gradient_checkpointing as the config says), LoRA
  r / alpha / dropout / targets / rsLoRA of lora.*; the initial A and B are qlorakit's, copied by module name
  (`copy_lora_weights`; the two sets of adapted modules must be equal);
- data: qlorakit's own pipeline (data.prepare_data with the config's data settings, the batch plan of
  data.epoch_batches walked by train.steps.Cursor, collate), checked against the data fingerprint the qlorakit
  run recorded in its checkpoint; the peer receives the same input_ids, position_ids and attention mask that
  train/forward.py gives qlorakit's model (the block-diagonal mask of packed rows);
- loss: the sum of token cross-entropies over the labels shifted by one (fp32), divided by the step's target
  count (train/loop.accumulate_gradients), from the peer's own logits; eval the same sum over the held-out
  batches divided by their target count (train/forward.evaluate);
- LoRA dropout: both draw their masks from torch's global CPU generator, one nn.Dropout per adapted module in the
  same forward order, so the generator state captured before qlorakit's first step, set before the peer's first
  step, gives both the same masks;
- optimizer and schedule: qlorakit's own optimizer (train/run.build_optimizer: training.optimizer, lr, weight
  decay, betas (0.9, 0.999), eps 1e-8; the 32-bit AdamW whose update is torch.optim.AdamW's, tests/optim) applied
  to PEFT's parameters, qlorakit's schedule (train/schedule.py: warm-up then cosine/linear/constant), and
  torch.nn.utils.clip_grad_norm_ to training.max_grad_norm, as qlorakit's loop does.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qlorakit.config import QloraConfig
from qlorakit.data import IGNORE_INDEX, epoch_batches, packed_attention_mask, prepare_data
from qlorakit.data.readers import resolve_data_path
from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.train.checkpoint import STATE_NAME, latest_checkpoint
from qlorakit.train.loss import count_targets
from qlorakit.train.run import build_optimizer
from qlorakit.train.run_state import examples_fingerprint
from qlorakit.train.runtime import DTYPES, Runtime
from qlorakit.train.schedule import lr_factor, warmup_steps_for
from qlorakit.train.steps import Cursor

PEFT_PREFIX = "base_model.model."


class PeerMismatch(RuntimeError):
    """The peer cannot be set up in step with qlorakit's run (different weights, modules or data)."""


def load_peer(model_dir: Path, cfg: QloraConfig) -> nn.Module:
    """transformers + bitsandbytes NF4 (double quant) + PEFT LoRA on the CPU, configured from `cfg`."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q, lo = cfg.quantization, cfg.lora
    if lo.adapter_dtype != "float32":
        raise PeerMismatch(f"lora.adapter_dtype {lo.adapter_dtype}: the peer keeps its adapters in float32 as PEFT "
                           "does on a 4-bit base; set lora.adapter_dtype=float32 to compare")
    if cfg.training.optimizer == "host_adamw_32bit":
        raise PeerMismatch("training.optimizer host_adamw_32bit steps inside backward and needs CUDA; the peer "
                           "comparison runs on the CPU: pick adamw_32bit or paged_adamw_32bit")
    compute = DTYPES[q.compute_dtype]
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb_config, dtype=compute,
                                                 device_map="cpu", attn_implementation=cfg.model.attn_implementation)
    checkpointing = cfg.training.gradient_checkpointing
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None)
    lora = LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                      use_rslora=lo.use_rslora, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def set_cpu_bf16_inference(peer: nn.Module, enabled: bool) -> bool:
    """Allow or forbid bitsandbytes' bf16 CPU inference path (module docstring) on every 4-bit linear of `peer`;
    returns whether this CPU has it (bitsandbytes set the switch when it built the layers)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    for module in peer.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = enabled and has_avx512bf16()
    return bool(has_avx512bf16())


def compare_4bit_weights(ours: nn.Module, peer: nn.Module) -> dict[str, Any]:
    """Every bitsandbytes 4-bit linear of `peer` against qlorakit's layer of the same path: the packed bytes, and
    the weights each dequantizes to in fp32. Raises PeerMismatch unless all are identical."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    mine = {name.removesuffix(".base_layer"): m for name, m in ours.named_modules() if isinstance(m, Linear4bit)}
    theirs = {name.removeprefix(PEFT_PREFIX).removesuffix(".base_layer"): m for name, m in peer.named_modules()
              if isinstance(m, bnb.nn.Linear4bit)}
    if set(mine) != set(theirs):
        raise PeerMismatch(f"4-bit linears differ: only qlorakit {sorted(set(mine) - set(theirs))[:3]}, only "
                           f"bitsandbytes {sorted(set(theirs) - set(mine))[:3]}")
    bytes_differ = weights_differ = 0
    for name, layer in mine.items():
        module = theirs[name]
        bytes_differ += int(not torch.equal(layer.weight.reshape(-1), module.weight.data.reshape(-1)))
        expected = dequantize_4bit(module.weight.data, module.weight.quant_state).to(torch.float32)
        weights_differ += int(not torch.equal(layer.dequantize(torch.float32), expected))
    if bytes_differ or weights_differ:
        raise PeerMismatch(f"of {len(mine)} 4-bit linears, {bytes_differ} hold other packed bytes and "
                           f"{weights_differ} dequantize to other weights than qlorakit's")
    return {"linears": len(mine), "packed_bytes_identical": True, "dequantized_fp32_identical": True}


def copy_lora_weights(init: dict[str, torch.Tensor], peer: nn.Module) -> int:
    """Copy qlorakit's PEFT-keyed LoRA tensors (adapters.peft_format.lora_state_dict: `base_model.model.<path>.
    lora_A.weight`) into the peer's adapter `default`; the adapted modules must be the same. Returns how many."""
    params = {name.replace(".default.", "."): p for name, p in peer.named_parameters() if ".lora_" in name}
    if set(params) != set(init):
        raise PeerMismatch(f"adapted modules differ: only qlorakit {sorted(set(init) - set(params))[:3]}, only "
                           f"PEFT {sorted(set(params) - set(init))[:3]}")
    with torch.no_grad():
        for name, value in init.items():
            if params[name].shape != value.shape:
                raise PeerMismatch(f"{name}: PEFT shape {list(params[name].shape)}, qlorakit {list(value.shape)}")
            params[name].copy_(value)
    return len(init)


def prepare_run_data(cfg: QloraConfig, tokenizer, cache_dir: Path | None):
    """The train and eval examples of `cfg`, through qlorakit's data pipeline with the config's data settings
    (as train/run.py calls it for an SFT run)."""
    d = cfg.data
    return prepare_data(
        resolve_data_path(d.path), tokenizer, fmt=d.format, max_seq_length=cfg.training.max_seq_length,
        template=d.template, train_on_inputs=d.train_on_inputs, overlong=d.overlong, text_field=d.text_field,
        messages_field=d.messages_field, eval_file=resolve_data_path(d.eval_file) if d.eval_file else None,
        eval_fraction=d.eval_fraction, max_eval_examples=d.max_eval_examples, seed=cfg.training.seed,
        cache_dir=cache_dir)


def check_same_data(prepared, run_dir: Path) -> str:
    """The fingerprint of `prepared` must be the data fingerprint qlorakit's run recorded in its last checkpoint
    (train/run.run_settings); returns it."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise PeerMismatch(f"{run_dir}: no checkpoint of qlorakit's run, whose data fingerprint the peer must match")
    recorded = json.loads((ckpt / STATE_NAME).read_text())["settings"]["exact"]["data_fingerprint"]
    mine = examples_fingerprint(prepared.train, prepared.eval)
    if mine != recorded:
        raise PeerMismatch(f"the peer's examples (fingerprint {mine}) are not the ones qlorakit's run trained on "
                           f"({recorded}, {ckpt}): benchmarks/quality_peer.prepare_run_data must call prepare_data "
                           "as train/run.py does")
    return mine


def peer_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], cfg: QloraConfig,
                  runtime: Runtime) -> torch.Tensor:
    """Summed token loss (fp32 scalar) of one collated micro-batch, from the peer's logits, with the inputs
    train/forward.py gives qlorakit's model: restarting position ids and, for packed rows, the block-diagonal
    additive mask (no mask for flash_attention_2, which separates packed rows by position ids)."""
    packing = cfg.data.packing
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if packing and cfg.model.attn_implementation != "flash_attention_2":
        inputs["attention_mask"] = packed_attention_mask(batch["segment_ids"], runtime.compute_dtype)
    elif not packing:
        inputs["attention_mask"] = batch["attention_mask"]
    with runtime.autocast():
        logits = model(**inputs, use_cache=False).logits
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def peer_evaluate(model: nn.Module, examples, cfg: QloraConfig, runtime: Runtime, pad_id: int) -> dict[str, float]:
    """Mean token loss over the held-out examples, in train/forward.evaluate's batches."""
    t = cfg.training
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for rows in epoch_batches(examples.lengths, t.batch_size, t.max_seq_length, cfg.data.packing, seed=t.seed,
                              epoch=0):
        batch = examples.collate(rows, pad_id)
        total += float(peer_loss_sum(model, batch, cfg, runtime))
        count += count_targets(batch["labels"])
    model.train(was_training)
    return {"eval_loss": total / max(1, count), "eval_tokens": count}


@dataclass
class PeerRun:
    losses: list[float] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    eval_after_bnb_cpu_bf16: float | None = None  # after training, through bitsandbytes' bf16 CPU inference path
    seconds: float = 0.0


def train_peer(model: nn.Module, prepared, cfg: QloraConfig, runtime: Runtime, pad_id: int, steps: int,
               rng_state: torch.Tensor) -> PeerRun:
    """`steps` optimizer steps of the peer over qlorakit's batch stream, evaluating before and after; the torch
    CPU generator starts from `rng_state` (qlorakit's, captured before its first step)."""
    t = cfg.training
    has_bf16_path = set_cpu_bf16_inference(model, False)
    optimizer = build_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    warmup = warmup_steps_for(steps, t.warmup_ratio)
    cursor = Cursor(lambda epoch: epoch_batches(prepared.train.lengths, t.batch_size, t.max_seq_length,
                                                cfg.data.packing, seed=t.seed, epoch=epoch))
    run = PeerRun()
    start = time.perf_counter()
    model.train()
    if prepared.eval is not None:
        run.eval_history.append({**peer_evaluate(model, prepared.eval, cfg, runtime, pad_id), "step": 0})
    torch.set_rng_state(rng_state)
    for step in range(steps):
        micro = [prepared.train.collate(cursor.next(), pad_id) for _ in range(t.gradient_accumulation)]
        n_targets = max(1, sum(count_targets(b["labels"]) for b in micro))
        lr = t.learning_rate * lr_factor(step, steps, warmup, t.scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for batch in micro:
            part = peer_loss_sum(model, batch, cfg, runtime)
            (part / n_targets).backward()
            loss_sum += float(part.detach())
        loss = loss_sum / n_targets
        if not math.isfinite(loss):
            raise PeerMismatch(f"the peer's loss became {loss} at step {step + 1}")
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.losses.append(loss)
    if prepared.eval is not None:
        run.eval_history.append({**peer_evaluate(model, prepared.eval, cfg, runtime, pad_id), "step": steps})
        if has_bf16_path:  # last: the repacked weights it leaves behind would break training (module docstring)
            set_cpu_bf16_inference(model, True)
            run.eval_after_bnb_cpu_bf16 = peer_evaluate(model, prepared.eval, cfg, runtime, pad_id)["eval_loss"]
    run.seconds = time.perf_counter() - start
    return run
