"""`qlorakit inspect`: how well each 4-bit data type fits each quantizable linear weight of a model folder.

For every weight that qlorakit quantizes (targets.py), read alone from the safetensors files and cast to fp32
(a Conv1D weight is transposed first, as the quantizer does), with n elements x and blocksize B:

* `std`: the population standard deviation sqrt(m2), where m_k = mean((x - mean(x))^k), computed in fp64;
* `excess_kurtosis`: m4 / m2^2 - 3 (Fisher's, biased moments, as scipy.stats.kurtosis by default): 0 for a
  normal distribution, 3 for a Laplace one; 0 for a constant weight;
* `normal_distance`: how far the absmax-normalised blocks are from the shape NF4 assumes. Each full block of B
  consecutive elements of the flattened row-major weight is multiplied by the fp32 reciprocal of its absmax
  (as the quantizer scales it) and sorted; the i-th smallest value is compared with
  z_i = ndtri((i + 0.5) / B) / ndtri((B - 0.5) / B), i = 0..B-1, the normal quantiles at the plotting positions
  (i + 0.5) / B scaled so that the extreme ones are -1 and 1. The distance is the mean of |sorted_i - z_i| over all
  full blocks and positions (fp64). Normal weights give a small positive value (sampling noise of 64 values),
  heavy tails a larger one (most values squeezed towards 0 by a large absmax). A short tail block is left out;
  with no full block the distance is None. An all-zero block counts as all zeros;
* `error`: the relative reconstruction error ||W - deq(q(W))||_F / ||W||_F (norms in fp64 of the fp32 tensors;
  0 for an all-zero W) for NF4 and FP4 through the blockwise reference (quant/blockwise.py), and for
  absmax-linear INT4: the same blockwise scaling, each value mapped to the nearest of the 15 levels k/7 of
  code_int4_symmetric() by the reference's rule (fp32 midpoints, a tie to the lower level), then
  fp32(level * absmax).

With calibration tokens (`--calibration-tokens N`), each layer also gets `output_error`, the relative error of
its output on its real inputs, ||X W^T - X deq(q(W))^T|| / ||X W^T|| per type (inspect_outputs.py).

Flags: `nf4_outlier` when a layer's NF4 error is above median + 3 * MAD of all layers' NF4 errors
(MAD = median(|e - median(e)|), unscaled; medians as torch.median, the lower middle value for an even count);
`beaten_by`: the types (fp4, int4) whose error is strictly below NF4's on that layer. With output errors, the same
two rules on them: `output_outlier` and `output_beaten_by`.

Memory: one weight at a time, plus a few fp32/fp64 temporaries of its size; the output errors need the whole
model in fp32 (inspect_outputs.py).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..errors import OptionValueError
from ..quant.blockwise import (scale_into_unit, check_blocksize, dequantize_blocks_4bit,
                               nearest_code_by_midpoints, quantize_blocks_4bit)
from ..quant.codebooks import code_int4_symmetric
from .checkpoint_files import find_checkpoint_files, require_model_folder
from .quantize_checkpoint import check_target_weights
from .targets import load_causal_lm_config, target_linears_of

if TYPE_CHECKING:
    from .inspect_outputs import Calibration

TYPES: tuple[str, ...] = ("nf4", "fp4", "int4")
OUTLIER_MADS = 3.0


def std_and_kurtosis(x: torch.Tensor) -> tuple[float, float]:
    """(sqrt(m2), m4 / m2^2 - 3) of all elements of `x` (any shape, float), in fp64; kurtosis 0 if constant."""
    centred = x.reshape(-1).to(torch.float64)
    centred -= centred.mean()
    m2 = centred.square().mean().item()
    kurtosis = 0.0 if m2 == 0 else centred.pow(4).mean().item() / (m2 * m2) - 3.0
    return math.sqrt(m2), kurtosis


def normal_quantiles(blocksize: int) -> torch.Tensor:
    """fp64 [blocksize]: ndtri((i + 0.5) / B) scaled so that the largest is 1 (the smallest is -1)."""
    p = (torch.arange(blocksize, dtype=torch.float64) + 0.5) / blocksize
    z = torch.special.ndtri(p)
    return z / z[-1]


def normal_distance(x: torch.Tensor, blocksize: int) -> float | None:
    """Mean |sorted absmax-normalised block - normal quantiles| over the full blocks of x (module docstring)."""
    flat = x.reshape(-1).to(torch.float32)
    full = flat.numel() // blocksize
    if full == 0:
        return None
    blocks = flat[: full * blocksize].view(full, blocksize)
    inv = 1.0 / blocks.abs().amax(dim=1).clamp(min=1e-38)
    ordered = (blocks * inv[:, None]).clamp(-1.0, 1.0).sort(dim=1).values.to(torch.float64)
    return (ordered - normal_quantiles(blocksize)).abs().mean().item()


def int4_roundtrip(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Absmax-linear INT4 quantize + dequantize of x (float, any shape) -> fp32 of x's shape (module docstring)."""
    flat = x.reshape(-1).to(torch.float32)
    scaled, absmax = scale_into_unit(flat, blocksize)  # the 4-bit reference's own scaling: only the code differs
    levels = code_int4_symmetric().to(flat.device)
    values = levels[nearest_code_by_midpoints(scaled, levels)]
    n, nb = flat.numel(), absmax.numel()
    padded = torch.nn.functional.pad(values, (0, nb * blocksize - n)).view(nb, blocksize)
    return (padded * absmax[:, None]).reshape(-1)[:n].reshape(x.shape)


def roundtrip(x: torch.Tensor, blocksize: int, kind: str) -> torch.Tensor:
    """deq(q(x)) in fp32 for kind 'nf4', 'fp4' (the blockwise reference) or 'int4' (int4_roundtrip)."""
    if kind == "int4":
        return int4_roundtrip(x, blocksize)
    packed, absmax = quantize_blocks_4bit(x, blocksize, kind)
    return dequantize_blocks_4bit(packed, absmax, x.shape, blocksize, kind, torch.float32)


def relative_error(x: torch.Tensor, restored: torch.Tensor) -> float:
    """||x - restored|| / ||x|| (Frobenius; fp32 difference, fp64 norms); 0 when x is all zeros."""
    x32 = x.to(torch.float32)
    norm = torch.linalg.vector_norm(x32, dtype=torch.float64).item()
    diff = torch.linalg.vector_norm(x32 - restored, dtype=torch.float64).item()
    return 0.0 if norm == 0 else diff / norm


@dataclass
class LayerReport:
    """The statistics of one weight (module docstring); `shape` as quantized ([out_features, in_features])."""

    name: str
    shape: list[int]
    numel: int
    std: float
    excess_kurtosis: float
    normal_distance: float | None
    error: dict[str, float]
    nf4_outlier: bool = False
    beaten_by: list[str] = field(default_factory=list)
    output_error: dict[str, float] | None = None  # None without calibration tokens
    output_outlier: bool = False
    output_beaten_by: list[str] = field(default_factory=list)


def layer_report(name: str, weight: torch.Tensor, blocksize: int = 64) -> LayerReport:
    """The statistics of one 2-D float weight (any device), flags unset (they depend on all layers)."""
    check_blocksize(blocksize)
    w = weight.to(torch.float32)
    std, kurtosis = std_and_kurtosis(w)
    errors = {kind: relative_error(w, roundtrip(w, blocksize, kind)) for kind in TYPES}
    return LayerReport(name, list(w.shape), w.numel(), std, kurtosis, normal_distance(w, blocksize), errors)


def median(values: list[float]) -> float:
    """torch.median of a list: the lower of the two middle values for an even count."""
    return torch.tensor(values, dtype=torch.float64).median().item()


def outlier_threshold(values: list[float]) -> float:
    """median + 3 * MAD of `values` (module docstring); nan for no values."""
    if not values:
        return math.nan
    mid = median(values)
    return mid + OUTLIER_MADS * median([abs(e - mid) for e in values])


def flag_layers(layers: list[LayerReport]) -> float:
    """Set nf4_outlier and beaten_by on every layer; returns the NF4 threshold median + 3 * MAD."""
    threshold = outlier_threshold([layer.error["nf4"] for layer in layers])
    for layer in layers:
        layer.nf4_outlier = layer.error["nf4"] > threshold
        layer.beaten_by = [kind for kind in TYPES[1:] if layer.error[kind] < layer.error["nf4"]]
    return threshold


def flag_outputs(layers: list[LayerReport]) -> float:
    """flag_layers' rules on the output errors: output_outlier and output_beaten_by of every layer that has output
    errors; returns their NF4 threshold (nan when no layer has any)."""
    measured = [layer for layer in layers if layer.output_error is not None]
    threshold = outlier_threshold([layer.output_error["nf4"] for layer in measured])
    for layer in measured:
        out = layer.output_error
        layer.output_outlier = out["nf4"] > threshold
        layer.output_beaten_by = [kind for kind in TYPES[1:] if out[kind] < out["nf4"]]
    return threshold


@dataclass
class InspectReport:
    """Per-layer statistics of a model folder, the outlier thresholds and parameter-weighted totals; with
    calibration, the tokens' count and source and the output errors' NF4 threshold."""

    model_dir: str
    blocksize: int
    layers: list[LayerReport]
    nf4_threshold: float
    calibration_tokens: int = 0
    calibration_source: str | None = None
    output_threshold: float | None = None

    def mean_errors(self) -> dict[str, float]:
        """Per type: sum(numel * error) / sum(numel) over the layers."""
        total = sum(layer.numel for layer in self.layers)
        return {kind: sum(layer.numel * layer.error[kind] for layer in self.layers) / total for kind in TYPES}

    def mean_output_errors(self) -> dict[str, float] | None:
        """Per type: sum(numel * output error) / sum(numel) over the layers that have output errors; None if none."""
        measured = [layer for layer in self.layers if layer.output_error is not None]
        total = sum(layer.numel for layer in measured)
        if not total:
            return None
        return {kind: sum(layer.numel * layer.output_error[kind] for layer in measured) / total for kind in TYPES}

    def best_type(self) -> str:
        means = self.mean_errors()
        return min(TYPES, key=lambda kind: means[kind])

    def to_json(self) -> dict[str, Any]:
        def names(flag: str) -> list[str]:
            return [layer.name for layer in self.layers if getattr(layer, flag)]

        return {
            "model_dir": self.model_dir, "blocksize": self.blocksize, "types": list(TYPES),
            "parameters": sum(layer.numel for layer in self.layers),
            "mean_error": self.mean_errors(), "best_type": self.best_type(),
            "nf4_outlier_threshold": self.nf4_threshold,
            "nf4_outliers": names("nf4_outlier"), "nf4_beaten": names("beaten_by"),
            "calibration": {"tokens": self.calibration_tokens, "source": self.calibration_source},
            "mean_output_error": self.mean_output_errors(), "output_outlier_threshold": self.output_threshold,
            "output_outliers": names("output_outlier"), "output_beaten": names("output_beaten_by"),
            "layers": [asdict(layer) for layer in self.layers],
        }

    def table(self, worst: int = 10) -> str:
        """The `worst` layers by NF4 error (by NF4 output error when measured), then the totals, as plain text."""
        outputs = self.mean_output_errors()
        ranked = sorted(self.layers, key=lambda layer: rank_key(layer, outputs is not None), reverse=True)[:worst]
        width = max([len("layer")] + [len(layer.name) for layer in ranked])
        out_head = "" if outputs is None else f"{'out:nf4':>7}  {'fp4':>7}  {'int4':>7}  "
        head = (f"{'layer':<{width}}  {'shape':>11}  {'std':>8}  {'kurt':>7}  {'dist':>6}  {'nf4':>7}  "
                f"{'fp4':>7}  {'int4':>7}  {out_head}flags")
        what = f"||W - deq(q(W))|| / ||W||; the {len(ranked)} worst by NF4 error:"
        if outputs is not None:
            what = (f"||W - deq(q(W))|| / ||W|| and of the output on {self.calibration_tokens} tokens of "
                    f"{self.calibration_source}, ||XW^T - X deq(q(W))^T|| / ||XW^T||; the {len(ranked)} worst by NF4 "
                    "output error:")
        lines = [f"{self.model_dir}: {len(self.layers)} linear weights, blocksize {self.blocksize}; relative error "
                 f"{what}", head]
        for layer in ranked:
            dist = "-" if layer.normal_distance is None else f"{layer.normal_distance:.4f}"
            moved = layer.output_error
            out = "" if outputs is None else "".join(
                "      -  " if moved is None else f"{moved[kind]:7.5f}  " for kind in TYPES)
            lines.append(
                f"{layer.name:<{width}}  {'x'.join(map(str, layer.shape)):>11}  {layer.std:8.5f}  "
                f"{layer.excess_kurtosis:7.2f}  {dist:>6}  {layer.error['nf4']:7.5f}  {layer.error['fp4']:7.5f}  "
                f"{layer.error['int4']:7.5f}  {out}{', '.join(layer_flags(layer))}")
        means = self.mean_errors()
        parameters = sum(layer.numel for layer in self.layers)
        lines.append(f"parameter-weighted mean error over {parameters:,} parameters: "
                     + ", ".join(f"{kind} {means[kind]:.5f}" for kind in TYPES) + f"; best overall: {self.best_type()}")
        lines.append(f"NF4 outliers (error > median + 3 MAD = {self.nf4_threshold:.5f}): "
                     f"{sum(layer.nf4_outlier for layer in self.layers)}; layers where FP4 or INT4 beats NF4: "
                     f"{sum(bool(layer.beaten_by) for layer in self.layers)}")
        if outputs is not None:
            lines.append("parameter-weighted mean output error: "
                         + ", ".join(f"{kind} {outputs[kind]:.5f}" for kind in TYPES)
                         + f"; output outliers (NF4 output error > median + 3 MAD = {self.output_threshold:.5f}): "
                         f"{sum(layer.output_outlier for layer in self.layers)}; layers where FP4 or INT4 moves the "
                         f"output less than NF4: {sum(bool(layer.output_beaten_by) for layer in self.layers)}")
        return "\n".join(lines)


def rank_key(layer: LayerReport, by_output: bool) -> float:
    """The table's order: NF4 error, or NF4 output error (a layer without one last)."""
    if not by_output:
        return layer.error["nf4"]
    return -1.0 if layer.output_error is None else layer.output_error["nf4"]


def layer_flags(layer: LayerReport) -> list[str]:
    """The table's flags of one layer: 'NF4 OUTLIER', 'OUTPUT OUTLIER', 'int4 < nf4', 'out: int4 < nf4', ..."""
    return ((["NF4 OUTLIER"] if layer.nf4_outlier else []) + (["OUTPUT OUTLIER"] if layer.output_outlier else [])
            + [f"{k} < nf4" for k in layer.beaten_by] + [f"out: {k} < nf4" for k in layer.output_beaten_by])


def check_calibration_tokens(folder: Path, tokens: int) -> None:
    """OptionValueError (one line) when `tokens` calibration tokens do not fit the model's context
    (config.json's max_position_embeddings, where it has one): they run as one sequence."""
    limit = getattr(load_causal_lm_config(folder), "max_position_embeddings", None)
    if isinstance(limit, int) and tokens > limit:
        raise OptionValueError(f"--calibration-tokens {tokens}: {folder} reads at most {limit} positions at once "
                               f"(max_position_embeddings in config.json) and the tokens run as one sequence; "
                               f"allowed 0 to {limit} (0: off)")


def inspect_model(model_dir: str | Path, blocksize: int = 64, progress: bool = True,
                  calibration: Callable[[], Calibration] | None = None) -> InspectReport:
    """The report of every quantizable linear weight of a local model folder, read one at a time; with
    `calibration`, also every linear's output error on the tokens it returns (inspect_outputs.py).

    `calibration` is called once, after the folder is checked and before any weight is read, so that a bad folder
    is reported before tokenizing and a token count over the model's context before the long passes.
    Raises CheckpointFormatError (one line naming the folder or file) when it is not a model folder, holds no
    safetensors weights, has no quantizable linears, or a weight is missing, not floating point or misshapen.
    """
    check_blocksize(blocksize)
    folder = require_model_folder(model_dir)
    checkpoint = find_checkpoint_files(folder)
    targets = target_linears_of(folder)
    where = checkpoint.key_to_file()
    check_target_weights(folder, targets, where)
    tokens = calibration() if calibration is not None else None
    if tokens is not None:
        check_calibration_tokens(folder, tokens.tokens)
    layers: list[LayerReport] = []
    for target in tqdm(list(targets.values()), desc="inspect", unit="layer", file=sys.stderr,
                       disable=not progress, leave=False):
        with safe_open(str(where[target.weight_key]), framework="pt") as f:
            weight = f.get_tensor(target.weight_key)
        if target.transposed:
            weight = weight.t().contiguous()
        layers.append(layer_report(target.name, weight, blocksize))
        del weight
    report = InspectReport(str(folder), blocksize, layers, flag_layers(layers))
    if tokens is not None:
        from .inspect_outputs import calibration_output_errors

        measured = calibration_output_errors(folder, list(targets), tokens.input_ids, blocksize, progress)
        for layer in layers:
            layer.output_error = measured.get(layer.name)
        report.calibration_tokens, report.calibration_source = tokens.tokens, tokens.source
        report.output_threshold = flag_outputs(layers)
    return report
