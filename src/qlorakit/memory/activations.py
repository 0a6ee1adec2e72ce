"""Activation bytes of one micro-batch, per layer policy (estimate.py's docstring states the memory model)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import QloraConfig
from ..model import offload_saved
from ..model.fused_blocks import keep_plan, layer_activation_bytes
from .shapes import ModelShape, dtype_bytes

GiB = 2**30
# train/loss.py FUSED_CHUNK_TOKENS (a test holds them equal): the fused loss's rows per chunk of logits.
LOSS_CHUNK_ROWS = 2048


@dataclass(frozen=True)
class Activations:
    saved: int  # all layers' saved activations at the end of the forward pass
    saved_first: int  # the first layer's share (what is left when backward reaches it)
    mask: int
    working_set: int
    loss: int
    what: str
    host: int = 0  # offloaded layer inputs in pinned host memory (training.offload_activations)


def _unfused_layer_bytes(shape: ModelShape, tokens: int, d: int) -> int:
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    h, inter = shape.hidden, shape.intermediate
    return tokens * (d * (5 * h + q + 2 * kv + 4 * inter) + 8 * h + 4 * shape.heads)


def _hosted_stay_bytes(shape: ModelShape, cfg: QloraConfig, adapted: list[str], tokens: int, d: int) -> int:
    """What a hosted layer keeps on the GPU: its saved tensors under offload_saved.MIN_BYTES, of those
    layer_activation_bytes and the x A^T products count: each adapter's x A^T, the two fp32 rstd, the fp32
    log-sum-exp per head."""
    per_layer = len(adapted) // max(1, shape.num_layers)
    sizes = [(tokens * cfg.lora.rank * d, per_layer), (4 * tokens, 2), (4 * shape.heads * tokens, 1)]
    return sum(size * n for size, n in sizes if size < offload_saved.MIN_BYTES)


def activations(shape: ModelShape, cfg: QloraConfig, adapted: list[str]) -> Activations:
    t, d = cfg.training, dtype_bytes(cfg.quantization.compute_dtype)
    # a preference objective runs each pair's chosen and rejected rows together: twice the rows of a batch
    batch, seq = t.batch_size * (1 if t.objective == "sft" else 2), t.max_seq_length
    tokens, h, layers = batch * seq, shape.hidden, shape.num_layers
    fused = shape.fusable_layers(adapted)["layer"] if t.fused_blocks and cfg.quantization.load_in_4bit else 0
    small, large = layer_activation_bytes(shape.config, tokens, d) if fused else (0, 0)
    # Saved beside what layer_activation_bytes counts (measured with saved_tensors_hooks): o_proj's input, a
    # contiguous copy of the attention output, and each adapted linear's x A^T [T, r].
    beyond = tokens * d * (h + cfg.lora.rank * len(adapted) // max(1, layers))
    unfused = _unfused_layer_bytes(shape, tokens, d) + beyond - tokens * d * h
    scores = batch * shape.heads * seq * seq if cfg.model.attn_implementation == "eager" else 0
    eager = scores * (4 + d)  # fp32 softmax output and its compute-dtype copy, saved per layer
    full = {"fused": large + beyond + eager, "unfused": unfused + eager}
    kinds = ["unfused"] * (layers - fused) + ["fused"] * fused  # keep_activations keeps the last fused layers
    if t.gradient_checkpointing:
        plan = keep_plan(layers, fused, small, large, int(t.keep_activations_gib * GiB),
                         int(t.host_activations_gib * GiB)) if fused else None
        kept, hosted = (plan.kept, plan.hosted) if plan else (0, 0)
        inputs = tokens * h * d
        recomputed = layers - kept - hosted
        # offload_activations: the recomputed layers' inputs wait in pinned host memory, but the highest one's
        # (model/offload.py); in backward the next one is reloaded while the current one is differentiated.
        offloaded = max(0, recomputed - 1) if t.offload_activations else 0
        saved = (plan.bytes + kept * (beyond + eager) if plan else 0) + (recomputed - offloaded) * inputs
        # host_activations_gib (model/offload_saved.py): hosted layers keep on the GPU only tensors under MIN_BYTES
        # (each adapter's x A^T at small T); IN_FLIGHT_LAYERS layers' moved tensors wait for their copies in
        # forward (all are let go before the loss), and in backward two layers' worth is back (current, next)
        stays = _hosted_stay_bytes(shape, cfg, adapted, tokens, d)
        saved += hosted * stays
        hosted_working = min(hosted, max(2, offload_saved.IN_FLIGHT_LAYERS)) * (small + beyond + eager)
        gate_up_recomputed = (large - small) if plan and plan.with_gate_up < kept else 0
        rebuild = max([full[k] for k in set(kinds[:recomputed])] + [gate_up_recomputed])
        # the prefetched input of the next layer down, and (measured, benchmarks/results/memory_estimate-llama3-8b-
        # h100.json: the offload rows exceed the recompute rows by 3 layer inputs at T = 8192 and 32768, not 1)
        # the reloaded input and its gradient while the layer's backward runs
        rebuild += 3 * inputs if offloaded else 0
        rebuild += hosted_working
        saved_first = inputs if recomputed else full[kinds[0]]
        what = f"{recomputed} recomputed layers' inputs" + (f" ({offloaded} in host memory)" if offloaded else "") \
            + (f", {kept} kept layers" if kept else "") \
            + (f", {hosted} layer{'s' if hosted > 1 else ''} kept in host memory" if hosted else "")
        host = offloaded * inputs + hosted * (small + beyond + eager - stays)
    else:
        saved = sum(full[k] for k in kinds)
        rebuild, saved_first, host = 0, full[kinds[0]] if kinds else 0, 0
        what = f"all {layers} layers (no checkpointing)"
    # The MLP backward holds four T x intermediate tensors at once, not three (measured: the recompute rows of
    # memory_estimate-llama3-8b-h100.json were short by T x intermediate x d at T = 8192 and 32768)
    working = rebuild + tokens * d * (4 * shape.intermediate + 3 * h) + 2 * scores * d
    packed_mask = cfg.data.packing and cfg.model.attn_implementation != "flash_attention_2"
    mask = batch * seq * seq * d if packed_mask else 0
    chunk = min(batch * (seq - 1), LOSS_CHUNK_ROWS)
    loss = chunk * shape.vocab * d + chunk * 4 + 5 * tokens * h * d
    kind = f"{fused} fused" if fused == layers else (f"{fused} fused, {layers - fused} unfused" if fused else "unfused")
    return Activations(saved, saved_first, mask, working, loss, f"{what}; {kind} layers", host)
