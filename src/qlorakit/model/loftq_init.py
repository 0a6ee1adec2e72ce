"""`lora.init: loftq`: LoRA weights that start as the best rank-r correction of what 4-bit quantization removed.

For every LoRA-targeted 4-bit linear, with W the weight as stored in the 16-bit checkpoint and deq the layer's own
dequantized weight in its compute dtype (exactly the base the adapter trains on), the residual R = W - deq is
decomposed by SVD, R = U diag(S) Vh, and the adapter starts at

    A0 = sqrt(S_r / scaling) Vh_r   [r, in_features],   B0 = U_r sqrt(S_r / scaling)   [out_features, r],

so that scaling * B0 @ A0 = U_r diag(S_r) Vh_r, the rank-r truncation R_r of R. By Eckart-Young that is the
rank-r matrix closest to R in the Frobenius (and spectral) norm, so the model starts at deq + R_r and its weight
error ||W - deq - R_r||_F^2 = sum of the dropped S_i^2. The 4-bit base is the standard one, unchanged (as PEFT's
`replace_lora_weights_loftq`; not LoftQ's alternating scheme, which also changes the quantized base). With the
base fixed there is nothing to iterate: the truncated SVD already is the optimum, so there is no iteration count.

The SVD runs in fp32 on the layer's device (cuSOLVER on a GPU, LAPACK on the CPU), one layer at a time: at most a
few [out_features, in_features] fp32 matrices exist at once. W is read again from the checkpoint files, one tensor
at a time, so a folder that stores only 4-bit weights (a `qlorakit quantize` or bitsandbytes output) cannot be
used: require_16bit_weights refuses it before anything is loaded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..errors import QloraConfigError
from ..logs import say_once
from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoraLinear
from .checkpoint_files import find_checkpoint_files
from .loader import stored_4bit_weights
from .targets import target_linears_of

log = logging.getLogger("qlorakit.model")


@dataclass
class LoftqReport:
    """Per initialised layer: ||R||_F^2 and the part of it the rank-r correction leaves, sum_{i>r} S_i^2 (fp32
    singular values, summed in float64)."""

    residual_sq: dict[str, float] = field(default_factory=dict)
    dropped_sq: dict[str, float] = field(default_factory=dict)
    default_init: list[str] = field(default_factory=list)  # targeted linears that are not 4-bit
    seconds: float = 0.0

    def line(self) -> str:
        total, left = sum(self.residual_sq.values()), sum(self.dropped_sq.values())
        ratio = (left / total) ** 0.5 if total > 0 else 0.0
        return (f"LoftQ init of {len(self.residual_sq)} 4-bit linears in {self.seconds:.1f} s: the adapters start "
                f"at the best rank-r correction of the quantization error; ||W - deq - s*B@A|| / ||W - deq|| = "
                f"{ratio:.4f} over all of them (1 with the default init)")


def require_16bit_weights(model_dir: str | Path) -> None:
    """QloraConfigError (one line) when `model_dir` stores bitsandbytes 4-bit weights: the LoftQ init needs W."""
    if stored_4bit_weights(Path(model_dir), find_checkpoint_files(model_dir)):
        raise QloraConfigError(
            f"lora.init loftq needs the 16-bit weights W to start from W - dequant(quant(W)), but {model_dir} "
            "stores 4-bit weights (a `qlorakit quantize` or bitsandbytes output): set model.name to the 16-bit "
            "checkpoint it came from, or use lora.init: default")


def residual_factors(w: torch.Tensor, deq: torch.Tensor, r: int, scaling: float
                     ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A0 [r, in] fp32, B0 [out, r] fp32, ||R||_F^2, sum of the dropped S_i^2) for R = W - deq.

    w, deq: [out_features, in_features], any float dtype, on one device (the SVD runs there, in fp32).
    scaling * B0 @ A0 = U_r diag(S_r) Vh_r. A rank above min(out, in) pads A0 and B0 with zeros."""
    residual = w.float() - deq.float()
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    k = min(r, s.numel())
    root = (s[:k] / scaling).sqrt()
    a = residual.new_zeros(r, residual.shape[1])
    b = residual.new_zeros(residual.shape[0], r)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root
    s64 = s.double()
    return a, b, float(s64.square().sum()), float(s64[k:].square().sum())


def loftq_initialize(model: nn.Module, model_dir: str | Path, names: list[str], progress: bool = True
                     ) -> LoftqReport:
    """Give the LoraLinear layers `names` of `model` (just injected, over the base loaded from `model_dir`) the
    LoftQ init (module docstring), and record every layer's starting weights in `initial_weights` (CPU copies in
    the adapter dtype, which save_adapter writes beside the adapter). Targeted linears that are not 4-bit have no
    quantization error: they keep the default init, said once."""
    t0 = time.perf_counter()
    report = LoftqReport()
    layers = {n: model.get_submodule(n) for n in names}
    quantized = [n for n, m in layers.items() if isinstance(m.base_layer, Linear4bit)]
    report.default_init = [n for n in names if n not in quantized]
    if report.default_init:
        say_once(log, "loftq-unquantized", "qlorakit: lora.init loftq: %d LoRA-targeted linears are not 4-bit "
                 "(e.g. %s), so there is no quantization error to start from; they get the default init",
                 len(report.default_init), report.default_init[0], level=logging.INFO)
    where = find_checkpoint_files(model_dir).key_to_file()
    transposed = {t.name for t in target_linears_of(model_dir).values() if t.transposed}
    for name in tqdm(quantized, desc="loftq init", unit="linear", disable=not progress, leave=False):
        layer: LoraLinear = layers[name]
        base = layer.base_layer
        with safe_open(str(where[name + ".weight"]), framework="pt") as f:
            w = f.get_tensor(name + ".weight").to(base.weight.device)
        if name in transposed:  # Conv1D stores [in_features, out_features]
            w = w.t()
        a, b, total, dropped = residual_factors(w, base.dequantize(base.dtype), layer.r, layer.scaling)
        del w
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        report.residual_sq[name], report.dropped_sq[name] = total, dropped
    for layer in layers.values():
        layer.initial_weights = (layer.lora_A.weight.detach().to("cpu", copy=True),
                                 layer.lora_B.weight.detach().to("cpu", copy=True))
    report.seconds = time.perf_counter() - t0
    log.info("qlorakit: %s", report.line())
    return report
