"""LoRA on top of any linear layer (usually Linear4bit): y = base(x) + scaling * B(A(dropout(x)))."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import math
import numbers

import torch
from torch import nn

from .linear4bit import Linear4bit
from .lora_fused import lora_linear_4bit


class LoraLinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update.

    Submodule names follow PEFT (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`), so a state dict key
    `<path>.lora_A.weight` is PEFT's `base_model.model.<path>.lora_A.weight` without the prefix.
    lora_A: [r, in_features], kaiming-uniform(a=sqrt(5)); lora_B: [out_features, r], zeros; both in
    `adapter_dtype`. scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.

    `initial_weights`: (lora_A, lora_B) as they were before training, CPU copies in the adapter dtype, when the
    adapter did not start from this default (lora.init loftq, model/loftq_init.py); None otherwise. Not part of
    the state dict; save_adapter writes them beside the adapter (a loftq adapter's export to the 16-bit base
    needs them).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 64,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        in_features, out_features = base_layer.in_features, base_layer.out_features
        device = _device_of(base_layer)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=adapter_dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A 4-bit base runs base + adapter in one autograd function (nn/lora_fused.py); other bases compose.
        self.fused = isinstance(base_layer, Linear4bit)
        self.initial_weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def set_bank(self, bank: "AdapterBankSlot | None") -> None:
        """Serve several adapters at once (inference): each row of x takes the adapter `bank.rows` names (see
        AdapterBankSlot); None goes back to this layer's own lora_A / lora_B."""
        self.__dict__["_bank"] = bank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.__dict__.get("_off"):  # adapters_disabled(): the base alone, as a model without the adapter
            return base(x)
        bank = self.__dict__.get("_bank")
        if bank is not None:
            return bank.forward(base(x), x)
        if self.fused and base.dense_copy is None:
            x = compute_input(x)
            p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
            return lora_linear_4bit(x, self.lora_A.weight, self.lora_B.weight, base.weight, base.quant_state,
                                    base.bias, self.scaling, p, self.training)
        y = self.base_layer(x)
        a = self.lora_A.weight
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(a.dtype)
        update = self.lora_B(self.lora_A(h)) * self.scaling
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32: [out_features, in_features], what a merge adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.use_rslora}"


class AdapterBankSlot:
    """One layer's share of several adapters, for inference: A [n, R, in] and B [n, out, R] stacked (ranks
    padded with zeros to the largest R; adapter 0 is all zeros, i.e. the base alone), scale [n], and `rows`, a
    LongTensor [batch] shared by all layers of a model, naming each row's adapter. Shapes stay fixed whatever
    the rows choose, so a captured CUDA graph follows later changes of `rows` (copy_ into it)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor):
        self.a, self.b, self.scale, self.rows = a, b, scale, rows

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (the base output, [batch, ..., out]) plus each row's own adapter update of x [batch, ..., in]."""
        batch = x.shape[0]
        rows = self.rows[:batch]
        xs = x.reshape(batch, -1, x.shape[-1]).to(self.a.dtype)
        a = self.a.index_select(0, rows)  # [batch, R, in]
        b = self.b.index_select(0, rows)  # [batch, out, R]
        update = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
        update = update * self.scale.index_select(0, rows).view(batch, 1, 1).to(update.dtype)
        return y + update.reshape(y.shape).to(y.dtype)


def compute_input(x: torch.Tensor) -> torch.Tensor:
    """x cast to the autocast dtype when autocast is on (what a fused 4-bit LoRA function computes in)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA (as PEFT computes it)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


__all__ = ["AdapterBankSlot", "Linear4bit", "LoraLinear", "lora_scaling"]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside: every LoraLinear of `model` computes its base layer alone (the model as it was before LoRA: a
    preference objective's reference). Nothing is copied; the adapters come back on exit, also after an error."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.__dict__["_off"] = True
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("_off", None)


@contextlib.contextmanager
def adapter_weights_swapped(model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Inside: each LoraLinear named in `weights` (module name -> (A, B), the layer's shapes and dtypes) computes
    with those adapter weights instead of its own (a frozen reference adapter; use under no_grad). The tensors are
    swapped, not copied; the layer's own come back on exit, also after an error."""
    layers = dict(model.named_modules())
    swapped = []
    try:
        for name, (a, b) in weights.items():
            layer = layers[name]
            layer.lora_A.weight.data, a_own = a, layer.lora_A.weight.data
            layer.lora_B.weight.data, b_own = b, layer.lora_B.weight.data
            swapped.append((layer, a_own, b_own))
        yield
    finally:
        for layer, a_own, b_own in swapped:
            layer.lora_A.weight.data, layer.lora_B.weight.data = a_own, b_own


def adapter_snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A frozen copy of every LoraLinear's adapter weights, by module name (for adapter_weights_swapped)."""
    return {name: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone())
            for name, m in model.named_modules() if isinstance(m, LoraLinear)}
