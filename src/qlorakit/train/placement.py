"""Where a run's activations and frozen tables live: kept on the GPU, moved to pinned host memory or recomputed
(training.keep_activations_gib, host_activations_gib, offload_activations), the input embeddings and LM head in
host memory (embeddings_on_host, head_on_host), grouped weights dequantized one at a time (stacked_dequant).
Each choice is said in the log; one that cannot be honoured here says why and what happens instead."""

from __future__ import annotations

import logging

from torch import nn

from ..config import QloraConfig
from .runtime import Runtime

log = logging.getLogger("qlorakit.train")


def place_activations(cfg: QloraConfig, model: nn.Module, runtime: Runtime, sharded: bool) -> None:
    """Checkpointing, kept / hosted / recomputed layers and offloaded layer inputs, as the config says."""
    t = cfg.training
    if not t.gradient_checkpointing:
        return
    from ..model.lora_inject import enable_activation_checkpointing

    enable_activation_checkpointing(model)
    if t.keep_activations_gib > 0 or t.host_activations_gib > 0:
        from ..model.fused_blocks import keep_activations

        tokens = t.batch_size * t.max_seq_length
        plan = keep_activations(model, tokens, int(t.keep_activations_gib * 2**30), int(t.host_activations_gib * 2**30))
        log.info(plan.line(tokens, t.keep_activations_gib, t.host_activations_gib))
        if t.host_activations_gib > 0 and not plan.hosted and plan.kept < plan.layers:
            log.warning("qlorakit: training.host_activations_gib: no layer keeps its activations in host memory: "
                        "only fully fused Llama decoder layers can (see the fused block paths line above), and "
                        "%s", "none is left below the kept ones" if plan.kept else "none of these is")
        if plan.hosted_indices:
            _host_saved(model, list(plan.hosted_indices), runtime, sharded)
    if t.offload_activations:
        _offload_inputs(model, runtime, sharded)


def _host_saved(model: nn.Module, which: list[int], runtime: Runtime, sharded: bool) -> None:
    from ..model.offload import decoder_layers
    from ..model.offload_saved import host_saved_activations

    if runtime.device.type != "cuda":
        log.warning("qlorakit: training.host_activations_gib needs a CUDA device (it moves saved activations "
                    "between the GPU and pinned host memory); on %s those %d layers keep theirs where they are",
                    runtime.device, len(which))
        return
    if sharded:
        layers = decoder_layers(model)
        for i in which:  # recomputed instead: the memory the plan counted on is not there to spend
            layers[i].gradient_checkpointing = True
            layers[i].mlp.keep_gate_up = True
        log.warning("qlorakit: training.host_activations_gib is not supported with distributed: fsdp yet; those "
                    "%d layers are recomputed instead", len(which))
        return
    host_saved_activations(model, which)


def _offload_inputs(model: nn.Module, runtime: Runtime, sharded: bool) -> None:
    """training.offload_activations: the recomputed layers' inputs go to pinned host memory (model/offload.py)."""
    from ..model.offload import decoder_layers, offload_layer_inputs

    if runtime.device.type != "cuda":
        log.warning("qlorakit: training.offload_activations needs a CUDA device (it moves layer inputs between "
                    "the GPU and pinned host memory); on %s every checkpointed layer keeps its input", runtime.device)
        return
    if sharded:
        log.warning("qlorakit: training.offload_activations is not supported with distributed: fsdp yet; the "
                    "layers are recomputed with their inputs kept on the GPU")
        return
    layers = decoder_layers(model)
    hosted = [i for i, layer in enumerate(layers) if hasattr(layer, "_qlorakit_checkpointing")]
    chosen = [i for i, layer in enumerate(layers)
              if getattr(layer, "gradient_checkpointing", False) and i not in hosted]
    offload_layer_inputs(model, chosen)
    log.info("qlorakit: activations: the inputs of %d of %d decoder layers wait for backward in pinned host "
             "memory (the highest one stays on the GPU)", len(chosen), len(layers))


def place_tables(cfg: QloraConfig, model: nn.Module, runtime: Runtime) -> None:
    """training.embeddings_on_host / head_on_host and stacked_dequant."""
    t = cfg.training
    if t.embeddings_on_host or t.head_on_host:
        _embeddings_to_host(cfg, model, runtime)
    if not t.stacked_dequant:
        from ..kernels import set_workspace_limit

        set_workspace_limit(0)  # grouped weights one at a time: the workspace holds the largest single weight
        log.info("qlorakit: training.stacked_dequant false: Q/K/V and gate/up weights are dequantized one at a time")


def _embeddings_to_host(cfg: QloraConfig, model: nn.Module, runtime: Runtime) -> None:
    """training.embeddings_on_host / head_on_host: the frozen input embedding table / LM head to pinned host memory
    (model/host_embedding)."""
    from ..model.host_embedding import host_embedding_bytes, move_embeddings_to_host, move_head_to_host

    if runtime.device.type != "cuda":
        log.warning("qlorakit: training.embeddings_on_host / head_on_host need a CUDA device; on %s the tables "
                    "stay where they are", runtime.device)
        return
    reason = move_embeddings_to_host(model) if cfg.training.embeddings_on_host else None
    if reason is not None:
        log.warning("qlorakit: training.embeddings_on_host: the input embeddings stay on the GPU: %s", reason)
    reason = move_head_to_host(model) if cfg.training.head_on_host else None
    if reason is not None:
        log.warning("qlorakit: training.head_on_host: the LM head stays on the GPU: %s", reason)
    if host_embedding_bytes(model):
        log.info("qlorakit: embeddings in pinned host memory (%.2f GiB): the batch's tokens are looked up on the "
                 "CPU; the LM head (if moved) is copied in for each loss and freed after its backward",
                 host_embedding_bytes(model) / 2**30)
