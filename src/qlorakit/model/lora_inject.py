"""Put LoRA layers on a loaded model's linears, by module name or on every block linear ('all-linear')."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import QloraConfigError
from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoraLinear

log = logging.getLogger("qlorakit.model")


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers LoRA may target: 4-bit or 16-bit linears, not the LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, (Linear4bit, nn.Linear)) and m is not head and not isinstance(m, LoraLinear)
        and ".lora_" not in name
    }


def select_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Module paths to adapt. A name matches a module whose path equals it or ends with '.' + name."""
    candidates = _candidates(model)
    if target_modules == "all-linear":
        return list(candidates)
    chosen: list[str] = []
    for wanted in target_modules:
        hits = [n for n in candidates if n == wanted or n.endswith("." + wanted)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise QloraConfigError(
                f"lora.target_modules: {wanted!r} matches no linear layer of this model; "
                f"allowed: 'all-linear' or names from {', '.join(leaves)}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def inject_lora(
    model: nn.Module,
    target_modules: str | list[str] = "all-linear",
    *,
    r: int = 64,
    alpha: float = 16.0,
    dropout: float = 0.05,
    use_rslora: bool = False,
    adapter_dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Replace each target linear by LoraLinear(base=it); freeze everything but the adapters.

    Returns the adapted module paths. Adapter weights are created on the base layer's device.
    """
    names = select_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, leaf)
        setattr(parent, leaf, LoraLinear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                         adapter_dtype=adapter_dtype))
    return names


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters; a 4-bit weight counts as its logical out x in parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Linear4bit):
            total += m.out_features * m.in_features
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """The line users know from PEFT: trainable params || all params || trainable%."""
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def keep_dense_copies_on_cpu(model: nn.Module, dtype: torch.dtype, enabled: bool = True) -> int:
    """On CPU there are no 4-bit kernels: dequantizing every weight on every call costs as much as the matmul.
    Keep one dequantized copy per 4-bit linear (the base is frozen, so it never changes) unless `enabled` is False
    (config model.cpu_dense_copies). Says what it did, once. Returns the bytes kept."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit) and m.weight.device.type == "cpu"]
    if not layers:
        return 0
    if not enabled:
        log.info("qlorakit: CPU run with 4-bit weights only (model.cpu_dense_copies false): every linear "
                 "dequantizes on each call, which is slow")
        return 0
    total = sum(m.keep_dense_copy(dtype) for m in layers)
    log.info("qlorakit: CPU run: keeping dequantized %s copies of the %d 4-bit linears (%.0f MiB), because the CPU "
             "has no 4-bit kernels; set model.cpu_dense_copies: false to keep only the 4-bit weights",
             str(dtype).removeprefix("torch."), len(layers), total / 2**20)
    return total


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of the decoder layers (transformers renamed the method in 5.x)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
