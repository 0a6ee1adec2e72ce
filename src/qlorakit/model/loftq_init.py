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

Calibrated (LoftqCalibration; `lora.loftq_calibration`): the weight norm treats every input direction alike, but
what the model computes is the layer's output on its inputs. With X [n, in] the layer's inputs on n tokens of the
training data (model/loftq_calibration.py) the init minimises the output error instead,

    ||X (R - D)^T||_F^2 / n = ||(R - D) L||_F^2,   L L^T = G = X^T X / n   (+ damping * mean(diag G) * I),

over D = scaling * B0 @ A0 of rank r. With M = R L, D L ranges over the rank-r matrices, so the optimum is
D = M_r L^-1 (Eckart-Young on M): A0 = sqrt(S_r / scaling) Vh_r L^-1 and B0 = U_r sqrt(S_r / scaling) from the
SVD of M, each rank-one part then rescaled (A0's row by t, B0's column by 1/t) to equal norms, as the plain init
has them. 'gram' uses the full G (Cholesky); 'diagonal' only its diagonal, L = diag(sqrt(g)), which weights each
input feature by its RMS. The damping keeps G invertible and directions the tokens never excite near the plain
init; G = c I gives the plain init exactly. Merging and the export for the 16-bit base do not depend on how
B0 A0 were found: they use the stored starting weights (adapters/loftq.py).

The SVD runs in fp32 on the layer's device (cuSOLVER on a GPU, LAPACK on the CPU), one layer at a time: at most a
few [out_features, in_features] fp32 matrices exist at once. W is read again from the checkpoint files, one tensor
at a time, so a folder that stores only 4-bit weights (a `qlorakit quantize` or bitsandbytes output) cannot be
used: require_16bit_weights refuses it before anything is loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
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
from .loftq_calibration import StatisticKind, input_statistics
from .targets import target_linears_of

log = logging.getLogger("qlorakit.model")


@dataclass(frozen=True)
class LoftqCalibration:
    """Weight each layer's quantization error by its inputs on `sequences` (int64 [L] token ids each, L >= 1: the
    first tokens of the training data): `method` 'gram' (their second moment G) or 'diagonal' (its diagonal), with
    `damping` times the mean of diag(G) added to G's diagonal; Grams of at most `max_bytes` per pass."""

    method: StatisticKind
    sequences: list[torch.Tensor]
    damping: float = 0.01
    max_bytes: int = 2 ** 31

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def record(self) -> dict:
        """What the adapter's record says of it (calibration None: {"method": "none"})."""
        return {"method": self.method, "tokens": self.tokens, "damping": self.damping}


@dataclass
class LoftqReport:
    """Per initialised layer: ||R||^2 and the part of it the rank-r correction leaves (fp32 singular values, summed
    in float64), in the weighting the init minimised (Frobenius without calibration); and ||R - s*B@A||_F^2."""

    residual_sq: dict[str, float] = field(default_factory=dict)
    dropped_sq: dict[str, float] = field(default_factory=dict)
    weight_left_sq: dict[str, float] = field(default_factory=dict)
    weight_sq: dict[str, float] = field(default_factory=dict)
    default_init: list[str] = field(default_factory=list)  # targeted linears that are not 4-bit
    uncalibrated: list[str] = field(default_factory=list)  # 4-bit ones the calibration forward never called
    calibration: LoftqCalibration | None = None
    seconds: float = 0.0

    def line(self) -> str:
        def ratio(left: dict[str, float], total: dict[str, float]) -> float:
            return (sum(left.values()) / sum(total.values())) ** 0.5 if sum(total.values()) > 0 else 0.0

        cal = self.calibration
        how = ("the best rank-r correction of the quantization error in the weight norm (uncalibrated)"
               if cal is None else f"the rank-r correction of the quantization error that least moves their "
               f"outputs on {cal.tokens} training tokens ({cal.method} calibration, damping {cal.damping:g}): "
               f"||(W - deq - s*B@A) L|| / ||(W - deq) L|| = {ratio(self.dropped_sq, self.residual_sq):.4f}")
        return (f"LoftQ init of {len(self.residual_sq)} 4-bit linears in {self.seconds:.1f} s: the adapters start "
                f"at {how}; ||W - deq - s*B@A|| / ||W - deq|| = {ratio(self.weight_left_sq, self.weight_sq):.4f} "
                f"over all of them (1 with the default init)")


def require_16bit_weights(model_dir: str | Path) -> None:
    """QloraConfigError (one line) when `model_dir` stores bitsandbytes 4-bit weights: the LoftQ init needs W."""
    if stored_4bit_weights(Path(model_dir), find_checkpoint_files(model_dir)):
        raise QloraConfigError(
            f"lora.init loftq needs the 16-bit weights W to start from W - dequant(quant(W)), but {model_dir} "
            "stores 4-bit weights (a `qlorakit quantize` or bitsandbytes output): set model.name to the 16-bit "
            "checkpoint it came from, or use lora.init: default")


def _weighting(stat: torch.Tensor, damping: float) -> torch.Tensor:
    """The damped weighting of a calibration statistic: the Cholesky factor L [in, in] of G + damping * mean(diag
    G) * I (stat G [in, in]), or the vector d = sqrt(g + damping * mean(g)) [in] (stat g [in]); fp32."""
    if stat.dim() == 1:
        return (stat + damping * stat.mean()).sqrt()
    ridge = damping * stat.diagonal().mean()
    return torch.linalg.cholesky(stat + ridge * torch.eye(stat.shape[0], dtype=stat.dtype, device=stat.device))


def residual_factors(w: torch.Tensor, deq: torch.Tensor, r: int, scaling: float, stat: torch.Tensor | None = None,
                     damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A0 [r, in] fp32, B0 [out, r] fp32, ||R||^2, what of it the rank-r start leaves) for R = W - deq.

    w, deq: [out_features, in_features], any float dtype, on one device (the SVD runs there, in fp32).
    stat None: the plain init, scaling * B0 @ A0 = U_r diag(S_r) Vh_r, norms Frobenius. stat (fp32, the layer's
    device, model/loftq_calibration.py) a Gram G [in, in] or its diagonal g [in]: the calibrated init, the rank-r
    D minimising ||(R - D) L||_F with L L^T = G + damping * mean(diag G) * I (for g, L = diag(d), module
    docstring), norms in that weighting. Each rank-one part keeps ||row of A0|| = ||column of B0||, as the plain
    init does. A rank above min(out, in) pads A0 and B0 with zeros."""
    residual = w.float() - deq.float()
    weight = None if stat is None else _weighting(stat.float(), damping)
    if weight is None:
        target = residual
    else:
        target = residual * weight if weight.dim() == 1 else residual @ weight
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    k = min(r, s.numel())
    root = (s[:k] / scaling).sqrt()
    a = residual.new_zeros(r, residual.shape[1])
    b = residual.new_zeros(residual.shape[0], r)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root
    if weight is not None:  # (D L) L^-1: A0 = A' L^-1, then each part rebalanced
        a = a / weight if weight.dim() == 1 else torch.linalg.solve_triangular(weight, a, upper=False, left=False)
        norm_a, norm_b = a.norm(dim=1), b.norm(dim=0)
        t = torch.where(norm_a > 0, (norm_b / norm_a).sqrt(), torch.ones_like(norm_a))
        a, b = a * t[:, None], b / t
    s64 = s.double()
    return a, b, float(s64.square().sum()), float(s64[k:].square().sum())


def _statistics(model: nn.Module, names: list[str], calibration: LoftqCalibration | None, report: LoftqReport
                ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, its calibration statistic or None) for every linear of `names`, one at a time."""
    if calibration is None:
        yield from ((n, None) for n in names)
        return
    done = set()
    for name, stat in input_statistics(model, names, calibration.sequences, calibration.method,
                                       calibration.max_bytes):
        done.add(name)
        yield name, stat
    report.uncalibrated = [n for n in names if n not in done]
    if report.uncalibrated:
        say_once(log, "loftq-uncalibrated", "qlorakit: lora.init loftq: the calibration forward never called %d "
                 "LoRA-targeted 4-bit linears (e.g. %s), so they have no inputs to weight by: they get the plain "
                 "SVD init", len(report.uncalibrated), report.uncalibrated[0])
    yield from ((n, None) for n in report.uncalibrated)


def loftq_initialize(model: nn.Module, model_dir: str | Path, names: list[str], progress: bool = True,
                     calibration: LoftqCalibration | None = None) -> LoftqReport:
    """Give the LoraLinear layers `names` of `model` (just injected, over the base loaded from `model_dir`) the
    LoftQ init (module docstring), weighted by their inputs on `calibration`'s tokens when given, and record every
    layer's starting weights in `initial_weights` (CPU copies in the adapter dtype, which save_adapter writes
    beside the adapter). Targeted linears that are not 4-bit have no quantization error: they keep the default
    init, said once."""
    t0 = time.perf_counter()
    report = LoftqReport(calibration=calibration)
    layers = {n: model.get_submodule(n) for n in names}
    quantized = [n for n, m in layers.items() if isinstance(m.base_layer, Linear4bit)]
    report.default_init = [n for n in names if n not in quantized]
    if report.default_init:
        say_once(log, "loftq-unquantized", "qlorakit: lora.init loftq: %d LoRA-targeted linears are not 4-bit "
                 "(e.g. %s), so there is no quantization error to start from; they get the default init",
                 len(report.default_init), report.default_init[0], level=logging.INFO)
    where = find_checkpoint_files(model_dir).key_to_file()
    transposed = {t.name for t in target_linears_of(model_dir).values() if t.transposed}
    bar = tqdm(total=len(quantized), desc="loftq init", unit="linear", disable=not progress, leave=False)
    for name, stat in _statistics(model, quantized, calibration, report):
        layer: LoraLinear = layers[name]
        base = layer.base_layer
        with safe_open(str(where[name + ".weight"]), framework="pt") as f:
            w = f.get_tensor(name + ".weight").to(base.weight.device)
        if name in transposed:  # Conv1D stores [in_features, out_features]
            w = w.t()
        deq = base.dequantize(base.dtype)
        damping = calibration.damping if calibration is not None else 0.0
        a, b, total, dropped = residual_factors(w, deq, layer.r, layer.scaling, stat, damping)
        left = w.float() - deq.float()
        report.weight_sq[name] = float(left.double().square().sum())
        left -= layer.scaling * (b @ a)
        report.weight_left_sq[name] = float(left.double().square().sum())
        del w, deq, left, stat
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        report.residual_sq[name], report.dropped_sq[name] = total, dropped
        bar.update()
    bar.close()
    for layer in layers.values():
        layer.initial_weights = (layer.lora_A.weight.detach().to("cpu", copy=True),
                                 layer.lora_B.weight.detach().to("cpu", copy=True))
    report.seconds = time.perf_counter() - t0
    log.info("qlorakit: %s", report.line())
    return report
