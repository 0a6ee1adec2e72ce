"""What `qlorakit train` checks at start when quantization.quant_type is not NF4: is the chosen 4-bit type
measurably worse than NF4 on this model's own weights?

Sampled, so that it costs about the same for any model size. From every target linear (targets.py) that the folder
stores in floating point, k = clamp(SAMPLE_ELEMENTS // (linears * in_features), 1, out_features) rows of its
weight W [out_features, in_features] (a Conv1D's transpose, as quantized), evenly spaced (row round(i (out - 1) /
(k - 1)), i = 0..k-1; row 0 when k = 1), are read through safetensors slices of the memory-mapped file, never the
whole tensor, cast to fp32 and quantized with both types through the reference (inspect_weights.roundtrip; the k
rows are one row-major tensor, so its blocks are the weight's own blocks whenever in_features is a multiple of the
blocksize). Each type's error is `qlorakit inspect`'s parameter-weighted mean, sum_l numel_l * e_l / sum_l numel_l,
with e_l = ||W_s - deq(q(W_s))||_F / ||W_s||_F on layer l's sampled rows W_s. With all rows sampled (a small model)
it is exactly inspect's number.

Cost: about SAMPLE_ELEMENTS (2^21) weights read and quantized twice, plus up to one row per linear where a single
row is more than that linear's share, on one CPU thread (_one_thread). The bundled 135M model (210 linears: 17 of
576-value rows or 6 of 1,536, 2,039,040 weights, 4 MiB read): 0.57 s on a busy 2-core CPU, besides the imports a
run makes anyway. A Llama-70B shape (560 linears, one row of 8,192 or 28,672 values each: 6.2 M weights, 12 MiB
read) is about three times that sample, so about 2 s by the same rate (estimated, not measured), against the
minutes it takes to load and quantize such a model.

The margin: the chosen type is called worse when its mean error is above MARGIN = 1.05 times NF4's. Sampling
noise is far below that (the mean pools tens of thousands of blocks; on the bundled model the sampled ratio
FP4/NF4, 1.3401, is within 0.2% of the full one, 1.3378), and 5% more relative error is 10% more quantization
noise power (it goes with the square), which a user should not pay without knowing; FP4 is 34% worse than NF4 on
the bundled model, so the margin is far from the cases it is meant for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointFormatError
from ..quant.blockwise import check_blocksize
from .checkpoint_files import find_checkpoint_files, require_model_folder
from .inspect_weights import relative_error, roundtrip
from .targets import TargetLinear, target_linears_of

SAMPLE_ELEMENTS = 1 << 21
MARGIN = 1.05
_FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TypeComparison:
    """Sampled mean relative errors of `quant_type` and of NF4 (module docstring) and what was sampled."""

    quant_type: str
    error: float
    nf4_error: float
    sampled: int  # weights quantized, per type
    parameters: int  # weights of the linears sampled
    linears: int

    def worse(self) -> bool:
        """The chosen type's mean error is above MARGIN times NF4's."""
        return self.error > MARGIN * self.nf4_error

    def warning(self, model: str) -> str:
        """One line for the log: the numbers, the margin, and how to look closer or choose NF4."""
        more = math.inf if self.nf4_error == 0 else self.error / self.nf4_error - 1
        return (f"quantization.quant_type {self.quant_type} fits this model's weights worse than nf4: mean relative "
                f"error {self.error:.4f} against nf4's {self.nf4_error:.4f} ({more:+.1%}, over the "
                f"{MARGIN - 1:.0%} margin; {self.sampled:,} of {self.parameters:,} weights of {self.linears} linears "
                f"sampled); per layer: `qlorakit inspect {model}`; quantization.quant_type: nf4 has less error and "
                "silences this")


def sampled_rows(out_features: int, k: int) -> list[int]:
    """k evenly spaced row indices of 0..out_features-1, first and last included (row 0 alone when k = 1)."""
    if k == 1:
        return [0]
    return sorted({round(i * (out_features - 1) / (k - 1)) for i in range(k)})


def _read_rows(handle, target: TargetLinear, rows: list[int]) -> torch.Tensor:
    """fp32 [len(rows), in_features]: those rows of the weight as quantized, read slice by slice."""
    piece = handle.get_slice(target.weight_key)
    if target.transposed:  # Conv1D stores [in_features, out_features]: a row of W is a column there
        parts = [piece[:, r: r + 1].reshape(-1) for r in rows]
    else:
        parts = [piece[r: r + 1].reshape(-1) for r in rows]
    return torch.stack(parts).to(torch.float32)


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch single-threaded for the block: a few rows per linear gain nothing from intra-op threads, and on a busy
    CPU their synchronisation costs more than the work (the bundled model: 0.5 s on one thread, 6 to 16 s on two
    of a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compare_with_nf4(model_dir: str | Path, quant_type: str, blocksize: int = 64,
                     budget: int = SAMPLE_ELEMENTS) -> TypeComparison:
    """The sampled comparison of `quant_type` ('fp4', ...) with NF4 on the floating-point linear weights of a
    local model folder (module docstring). CheckpointFormatError (one line) when the folder is not a model or
    stores no linear weight in 16/32 bits (a pre-quantized folder: its type is already chosen)."""
    check_blocksize(blocksize)
    folder = require_model_folder(model_dir)
    where = find_checkpoint_files(folder).key_to_file()
    targets = [t for t in target_linears_of(folder).values() if t.weight_key in where]
    error = nf4 = 0.0
    sampled = parameters = linears = 0
    with ExitStack() as stack:
        stack.enter_context(_one_thread())
        handles: dict[Path, object] = {}
        for target in targets:
            path = where[target.weight_key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            if handles[path].get_slice(target.weight_key).get_dtype() not in _FLOAT_DTYPES:
                continue
            k = min(target.out_features, max(1, budget // (len(targets) * target.in_features)))
            w = _read_rows(handles[path], target, sampled_rows(target.out_features, k))
            numel = target.out_features * target.in_features
            error += numel * relative_error(w, roundtrip(w, blocksize, quant_type))
            nf4 += numel * relative_error(w, roundtrip(w, blocksize, "nf4"))
            sampled, parameters, linears = sampled + w.numel(), parameters + numel, linears + 1
    if not linears:
        raise CheckpointFormatError(f"{folder}: no linear weight stored in 16 or 32 bits to compare the 4-bit types "
                                    "on (a pre-quantized folder keeps the type it was written with)")
    return TypeComparison(quant_type, error / parameters, nf4 / parameters, sampled, parameters, linears)
