"""Fused training paths for Llama blocks, and which layers keep their activations instead of recomputing them.

`enable_fused_blocks(model)` gives each eligible module of a Llama model a subclass of its own class (same
module object, same parameters, buffers and state-dict keys; `disable_fused_blocks` gives the class back):
- LlamaAttention: Q, K and V as one fused 4-bit LoRA group (nn/lora_blocks.lora_group_4bit: one stacked 4-bit
  matmul forward and backward, the input saved once);
- LlamaMLP: gate/up fused, SwiGLU and down in one autograd function (nn/lora_blocks.lora_swiglu_4bit);
- LlamaRMSNorm with a frozen weight: one-pass kernels (nn/rmsnorm.rms_norm);
- LlamaDecoderLayer whose four parts are all fused: its two RMSNorms run inside the Q/K/V group and the MLP,
  which keep the layer's un-normed inputs for backward and recompute the normed ones (one pass each).
A fused module computes what the module it replaces computes (tests/nn/test_fused_blocks.py holds them to it).
It takes its fused path for inputs of more than SMALL_M_MAX rows without a KV cache (training, prefill); decoding
goes through the original forward, whose 1..16-row 4-bit kernels are faster there. Modules that are not eligible
keep their class, and the log says once which and why.

`keep_activations(model, tokens, budget_bytes)` turns activation checkpointing off for as many fused layers as
the budget holds (the last ones), first keeping everything but the MLP's gate/up output (recomputed in backward
from the kept input: one matmul), then, with budget left over, that output too.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import SMALL_M_MAX
from ..logs import say_once
from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoraLinear, compute_input
from ..nn.lora_blocks import Norm, Projection, lora_group_4bit, lora_swiglu_4bit
from ..nn.rmsnorm import rms_norm
from ..nn.rope import qkv_rope, qkv_rope_supported
from .shared_attention import attend_rows

log = logging.getLogger("qlorakit.model")


def _dropout_p(layer: LoraLinear) -> float:
    return layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def _why_not_fusable(owner: nn.Module, names: tuple[str, ...]) -> str | None:
    """None when the named projections of `owner` can run as one fused 4-bit LoRA group, else the reason."""
    layers = [getattr(owner, n, None) for n in names]
    for n, layer in zip(names, layers):
        if not isinstance(layer, LoraLinear):
            return f"{n} has no LoRA adapter"
        if not isinstance(layer.base_layer, Linear4bit):
            return f"{n} is not a 4-bit layer"
        if layer.base_layer.dense_copy is not None:
            return f"{n} keeps a dense copy of its weight (CPU run)"
        if layer.__dict__.get("_bank") is not None:
            return f"{n} serves several adapters"
    off = {bool(layer.__dict__.get("_off")) for layer in layers}
    if off == {True} and torch.is_grad_enabled():
        return "its adapters are switched off while gradients are on"
    if len(off) > 1:
        return "some of its adapters are switched off, others not"
    if len({_dropout_p(layer) for layer in layers}) > 1:
        return "its projections have different LoRA dropout"
    return None


def _projection(layer: LoraLinear) -> Projection:
    base = layer.base_layer
    return Projection(base.weight, base.quant_state, base.bias, layer.scaling)


def _adapters(layers: list[LoraLinear]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (A, B) weights of each layer; None when they are switched off (nn.lora.adapters_disabled: a preference
    objective's reference pass, without gradients), so the fused functions compute the base projections alone."""
    if layers[0].__dict__.get("_off"):
        return None
    return [(layer.lora_A.weight, layer.lora_B.weight) for layer in layers]


def _norm_spec(norm: nn.Module | None, x: torch.Tensor) -> Norm | None:
    """The fused functions' Norm for an RMSNorm module (None for none): its weight and eps, and the dtype its
    output is cast to (the autocast dtype, as the next linear layer would cast it)."""
    if norm is None:
        return None
    dtype = torch.promote_types(norm.weight.dtype, x.dtype)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return Norm(norm.weight, norm.variance_epsilon, dtype)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def _attention_interface(config):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    impl = config._attn_implementation
    get = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if get is not None:
        return get(impl, eager_attention_forward)
    return eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


_QKV = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _fused_classes():
    from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm,
                                                          apply_rotary_pos_emb)

    class FusedLlamaAttention(LlamaAttention):
        """LlamaAttention with Q/K/V as one fused 4-bit LoRA group (training and prefill, no KV cache)."""

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            if cache is not None or _rows(hidden_states) <= SMALL_M_MAX or _why_not_fusable(self, _QKV):
                return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
            return self.fused_forward(hidden_states, position_embeddings, attention_mask, None, **kwargs)

        def fused_forward(self, hidden_states, position_embeddings, attention_mask, norm: nn.Module | None,
                          **kwargs):
            """(o_proj output, attention weights) of hidden_states, normed by `norm` inside the Q/K/V group."""
            kwargs.pop("past_key_values", None)
            kwargs.pop("cache", None)
            rows = kwargs.pop("shared_rows", None)  # rows sharing a prefix (model/shared_attention.py)
            layers = [getattr(self, n) for n in _QKV]
            x = hidden_states if norm is not None else compute_input(hidden_states)
            qkv = lora_group_4bit(x, tuple(_projection(m) for m in layers), _adapters(layers),
                                  _dropout_p(layers[0]), layers[0].training, _norm_spec(norm, hidden_states))
            input_shape = hidden_states.shape[:-1]
            cos, sin = position_embeddings
            if qkv_rope_supported(qkv, cos, self.head_dim):
                d = self.head_dim
                q, k, v = qkv_rope(qkv, cos, sin, layers[0].out_features // d, layers[1].out_features // d, d)
            else:
                say_once(log, "qkv_rope", "qlorakit: Q/K/V split and RoPE run through transformers' ops: the fused "
                         "kernel takes [B, S, N] inputs, cos/sin of [1 or B, S, D] and a power-of-two head_dim")
                hidden_shape = (*input_shape, -1, self.head_dim)
                q, k, v = (t.view(hidden_shape).transpose(1, 2)
                           for t in qkv.split([m.out_features for m in layers], dim=-1))
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
            attend = _attention_interface(self.config)
            dropout = 0.0 if not self.training else self.attention_dropout
            if rows is not None and self.config._attn_implementation == "sdpa":  # causal attention, no mask
                attn_output, attn_weights = attend_rows(attend, self, q, k, v, rows, dropout=dropout,
                                                        scaling=self.scaling, **kwargs)
            else:  # the 4-D mask that came with the shared rows says what each position sees
                attn_output, attn_weights = attend(self, q, k, v, attention_mask, dropout=dropout,
                                                   scaling=self.scaling, **kwargs)
            attn_output = attn_output.reshape(*input_shape, -1).contiguous()
            return self.o_proj(attn_output), attn_weights

    class FusedLlamaMLP(LlamaMLP):
        """LlamaMLP (SwiGLU) as one autograd function with gate/up fused (more than SMALL_M_MAX rows)."""

        keep_gate_up = True  # whether backward finds the gate/up output saved (else recomputes it)

        def forward(self, x):
            if _rows(x) <= SMALL_M_MAX or _why_not_fusable(self, _MLP):
                return super().forward(x)
            return self.fused_forward(x, None)

        def fused_forward(self, x, norm: nn.Module | None):
            """The MLP of x, normed by `norm` inside the fused function."""
            layers = [getattr(self, n) for n in _MLP]
            gate, up, down = (_projection(m) for m in layers)
            return lora_swiglu_4bit(x if norm is not None else compute_input(x), gate, up, down, _adapters(layers),
                                    _dropout_p(layers[0]), layers[0].training, keep_gate_up=self.keep_gate_up,
                                    norm=_norm_spec(norm, x))

    class FusedLlamaDecoderLayer(LlamaDecoderLayer):
        """A decoder layer whose RMSNorms run inside the fused Q/K/V group and MLP, which then keep the layer's
        un-normed inputs for backward (the normed ones are recomputed: one pass each)."""

        def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            if (cache is not None or _rows(hidden_states) <= SMALL_M_MAX
                    or not isinstance(self.self_attn, FusedLlamaAttention) or _why_not_fusable(self.self_attn, _QKV)
                    or not isinstance(self.mlp, FusedLlamaMLP) or _why_not_fusable(self.mlp, _MLP)
                    or self.input_layernorm.weight.requires_grad or self.post_attention_layernorm.weight.requires_grad):
                return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
            kwargs.pop("use_cache", None)
            position_embeddings = kwargs.pop("position_embeddings", None)
            attn, _ = self.self_attn.fused_forward(hidden_states, position_embeddings, attention_mask,
                                                   self.input_layernorm, position_ids=position_ids, **kwargs)
            hidden_states = hidden_states + attn
            return hidden_states + self.mlp.fused_forward(hidden_states, self.post_attention_layernorm)

    class FusedLlamaRMSNorm(LlamaRMSNorm):
        """LlamaRMSNorm through the one-pass rms_norm kernels (frozen weight)."""

        def forward(self, hidden_states):
            if self.weight.requires_grad:
                return super().forward(hidden_states)
            return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    return {LlamaAttention: FusedLlamaAttention, LlamaMLP: FusedLlamaMLP, LlamaRMSNorm: FusedLlamaRMSNorm,
            LlamaDecoderLayer: FusedLlamaDecoderLayer}


_FUSED: dict[type, type] = {}


def fused_classes() -> dict[type, type]:
    """{transformers class: its fused subclass} (built once, on first use)."""
    if not _FUSED:
        _FUSED.update(_fused_classes())
    return _FUSED


@dataclass
class FusedReport:
    fused: Counter
    not_fused: Counter  # (module kind, reason) -> count

    def line(self) -> str:
        done = ", ".join(f"{n} {kind}" for kind, n in self.fused.items()) or "nothing"
        text = f"qlorakit: fused block paths: {done}"
        if self.not_fused:
            text += "; not fused: " + ", ".join(f"{n} {kind} ({why})" for (kind, why), n in self.not_fused.items())
        return text


def enable_fused_blocks(model: nn.Module) -> FusedReport:
    """Give every eligible Llama attention / MLP / frozen RMSNorm module of `model` its fused class (see the
    module docstring); logs once which modules were fused and why others were not. Call after inject_lora."""
    classes = fused_classes()
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm

    fused, not_fused = Counter(), Counter()
    kinds = {LlamaAttention: ("attention (Q/K/V fused)", _QKV), LlamaMLP: ("MLP (gate/up fused + SwiGLU + down)", _MLP)}
    for module in model.modules():
        cls = type(module)
        if cls in kinds:
            kind, names = kinds[cls]
            why = _why_not_fusable(module, names)
            if cls is LlamaMLP and why is None and getattr(module.config, "hidden_act", "silu") != "silu":
                why = f"activation {module.config.hidden_act!r} is not silu"
            if why is None:
                module.__class__ = classes[cls]
                fused[kind] += 1
            else:
                not_fused[(kind, why)] += 1
        elif cls is LlamaRMSNorm:
            if module.weight.requires_grad:
                not_fused[("RMSNorm", "its weight trains")] += 1
            else:
                module.__class__ = classes[cls]
                fused["RMSNorm"] += 1
        elif type(module).__name__.endswith(("Attention", "MLP")) and "Llama" not in type(module).__name__ \
                and any(isinstance(c, LoraLinear) for c in module.children()):
            not_fused[(type(module).__name__, "no fused path for this architecture")] += 1
    for module in model.modules():
        if type(module) is LlamaDecoderLayer and type(module.self_attn) is classes[LlamaAttention] \
                and type(module.mlp) is classes[LlamaMLP] and type(module.input_layernorm) is classes[LlamaRMSNorm] \
                and type(module.post_attention_layernorm) is classes[LlamaRMSNorm]:
            module.__class__ = classes[LlamaDecoderLayer]
            fused["decoder layers (RMSNorms inside the fused groups)"] += 1
    report = FusedReport(fused, not_fused)
    log.info(report.line())
    return report


def disable_fused_blocks(model: nn.Module) -> None:
    """Give every fused module its original transformers class back."""
    back = {v: k for k, v in fused_classes().items()}
    for module in model.modules():
        if type(module) in back:
            module.__class__ = back[type(module)]


def layer_activation_bytes(config, tokens: int, dtype_bytes: int = 2) -> tuple[int, int]:
    """(bytes a fused Llama decoder layer keeps for backward without its MLP's gate/up output, bytes with it)
    for `tokens` tokens: the layer input, Q/K/V after RoPE, the attention output (+ fp32 log-sum-exp per head),
    the residual after attention, two fp32 rstd, and the gate/up output [tokens, 2I]."""
    h, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = config.num_key_value_heads * head_dim
    per_token = dtype_bytes * (3 * h + heads * head_dim + 2 * kv) + 4 * heads + 8
    without = tokens * per_token
    return without, without + tokens * dtype_bytes * 2 * inter


@dataclass
class KeepPlan:
    kept: int  # layers whose activations are kept on the GPU (not recomputed in backward)
    with_gate_up: int  # of those, layers that keep the MLP's gate/up output too
    layers: int
    bytes: int
    hosted: int = 0  # layers below the kept ones whose activations wait in pinned host memory (no gate/up output)
    host_bytes: int = 0
    hosted_indices: tuple[int, ...] = ()  # their indices in the decoder (keep_activations fills it)

    def line(self, tokens: int, budget_gib: float, host_gib: float = 0.0) -> str:
        host = (f", {self.hosted} keep theirs in pinned host memory (about {self.host_bytes / 2**30:.1f} GiB, "
                f"training.host_activations_gib={host_gib:g})") if self.hosted or host_gib else ""
        return (f"qlorakit: activations: {self.kept} of {self.layers} layers keep theirs for backward "
                f"({self.with_gate_up} with the MLP's gate/up output){host}, "
                f"{self.layers - self.kept - self.hosted} are recomputed; about {self.bytes / 2**30:.1f} GiB on the "
                f"GPU at {tokens} tokens per micro-batch (training.keep_activations_gib={budget_gib:g})")


def keep_plan(layers: int, fused_layers: int, small: int, large: int, budget_bytes: int,
              host_budget_bytes: int = 0) -> KeepPlan:
    """How many of `fused_layers` (of `layers`) keep their activations within `budget_bytes` on the GPU, and how
    many of the rest within `host_budget_bytes` in host memory, given the bytes one layer keeps without and with
    its MLP's gate/up output (layer_activation_bytes). Pure arithmetic: the memory estimator (qlorakit.memory)
    plans with it exactly as keep_activations does."""
    kept = min(fused_layers, budget_bytes // small)
    with_gu = min(kept, (budget_bytes - kept * small) // (large - small)) if kept else 0
    hosted = min(fused_layers - kept, host_budget_bytes // small)
    return KeepPlan(kept, with_gu, layers, kept * small + with_gu * (large - small), hosted, hosted * small)


def keep_activations(model: nn.Module, tokens: int, budget_bytes: int, host_budget_bytes: int = 0) -> KeepPlan:
    """Turn activation checkpointing off for the last fused decoder layers that `budget_bytes` of kept
    activations at `tokens` tokens per micro-batch can hold (layer_activation_bytes), and on for the other fused
    layers (call it on a model whose checkpointing is enabled; calling it again re-plans). The fused layers right
    below the kept ones that `host_budget_bytes` holds (without their gate/up output) are planned to keep theirs
    in host memory: they are left unchecked like kept layers and listed in the plan's `hosted_indices` for
    offload_saved.host_saved_activations. Layers that are not fully fused are never chosen (their unfused modules
    keep far more) and are left as they are."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = list(getattr(decoder, "layers", []))
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    fused_layer = fused_classes()[LlamaDecoderLayer]
    fused = [layer for layer in layers if type(layer) is fused_layer]
    if not fused:
        return KeepPlan(0, 0, len(layers), 0)
    plan = keep_plan(len(layers), len(fused), *layer_activation_bytes(model.config, tokens), budget_bytes,
                     host_budget_bytes)
    kept, with_gu, hosted = plan.kept, plan.with_gate_up, plan.hosted
    chosen = fused[len(fused) - kept:]
    for i, layer in enumerate(chosen):
        layer.gradient_checkpointing = False
        layer.mlp.keep_gate_up = i >= kept - with_gu
    below = fused[:len(fused) - kept]
    for layer in below[len(below) - hosted:]:
        layer.gradient_checkpointing = False
        layer.mlp.keep_gate_up = False
    for layer in below[:len(below) - hosted]:
        layer.gradient_checkpointing = True
        layer.mlp.keep_gate_up = True  # a checkpointed layer recomputes everything anyway; keep its backward lean
    plan.hosted_indices = tuple(layers.index(layer) for layer in below[len(below) - hosted:])
    return plan
