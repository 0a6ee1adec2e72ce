"""`qlorakit inspect --calibration-tokens N`: per quantizable linear, how far NF4, FP4 and INT4 move the layer's
output on its real inputs.

The model folder's weights are loaded unquantized by qlorakit's loader (model/loader.py with load_in_4bit False:
the transformers architecture built on the meta device, the safetensors tensors read one at a time and cast to
fp32, which is exact for bf16/fp16 weights; a Conv1D weight becomes an nn.Linear of its transpose), on the CPU, and
run once in fp32 over `input_ids` [1, N] (one sequence, no padding, no KV cache, only the last position's logits).
A forward hook on every target linear receives its input X, flattened to [N, in_features] fp32, and computes there,
one layer at a time, with W the layer's fp32 weight [out_features, in_features]:

    output_error[kind] = ||X (W - deq(q(W)))^T||_F / ||X W^T||_F        (0 when X W^T is all zeros)

for kind nf4 and fp4 (the blockwise reference, quant/blockwise.py) and int4 (inspect_weights.int4_roundtrip): the
relative error ||X W^T - X deq(q(W))^T|| / ||X W^T||, with the difference taken on the weights (W - deq in fp32)
so that two nearly equal products are never subtracted. Products in fp32, norms in fp64. The bias is left out: it
is not quantized and cancels in the difference. A linear the forward calls several times adds up the squared
norms of every call; one it never calls gets no output error.

Memory: the model in fp32 (4 bytes a parameter: 0.5 GiB for the bundled 135M model, 28 GiB for a 7B one); what
one forward over N tokens holds at a time (transformers frees each layer's activations as it goes); and, for the
one layer being computed, a few fp32 temporaries of its weight's size (the quantizer's, deq(q(W)), W - deq: about
16 x out x in bytes) and two fp32 products [N, out] (8 x N x out bytes). No input is kept once its layer's hook
returns. The bundled model at N = 256: 1.22 GiB peak host memory for the whole `qlorakit inspect`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .inspect_weights import TYPES, roundtrip


@dataclass(frozen=True)
class Calibration:
    """The tokens the 16-bit model runs on: `input_ids` int64 [1, N] on the CPU, and where they came from."""

    input_ids: torch.Tensor
    source: str

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def output_error_squares(x: torch.Tensor, weight: torch.Tensor, blocksize: int) -> tuple[float, dict[str, float]]:
    """(||X W^T||^2, {kind: ||X (W - deq(q(W)))^T||^2}) in fp64, for inputs x [..., in_features] and weight
    [out_features, in_features] (any float dtypes, one device; both cast to fp32, products in fp32)."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    w = weight.to(torch.float32)
    reference = torch.linalg.vector_norm(x2 @ w.t(), dtype=torch.float64).item() ** 2
    moved = {}
    for kind in TYPES:
        diff = w - roundtrip(w, blocksize, kind)
        moved[kind] = torch.linalg.vector_norm(x2 @ diff.t(), dtype=torch.float64).item() ** 2
    return reference, moved


def output_errors(x: torch.Tensor, weight: torch.Tensor, blocksize: int) -> dict[str, float]:
    """The output error of each type (module docstring) of one call with inputs x [..., in_features]."""
    reference, moved = output_error_squares(x, weight, blocksize)
    return {kind: 0.0 if reference == 0 else math.sqrt(moved[kind] / reference) for kind in TYPES}


class _Sums:
    """Squared norms of one linear, added over the calls the forward makes to it."""

    def __init__(self) -> None:
        self.calls = 0
        self.reference = 0.0
        self.moved = dict.fromkeys(TYPES, 0.0)

    def add(self, x: torch.Tensor, weight: torch.Tensor, blocksize: int) -> None:
        reference, moved = output_error_squares(x, weight, blocksize)
        self.calls += 1
        self.reference += reference
        for kind in TYPES:
            self.moved[kind] += moved[kind]

    def errors(self) -> dict[str, float]:
        return {kind: 0.0 if self.reference == 0 else math.sqrt(self.moved[kind] / self.reference)
                for kind in TYPES}


def calibration_output_errors(model_dir: str | Path, names: list[str], input_ids: torch.Tensor, blocksize: int = 64,
                              progress: bool = True) -> dict[str, dict[str, float]]:
    """Linear name -> {kind: output error} for the target linears `names` (module paths), from one fp32 forward
    of the unquantized model in `model_dir` over input_ids (int64 [1, N], CPU); see the module docstring."""
    from .loader import load_model

    model, _ = load_model(model_dir, load_in_4bit=False, compute_dtype=torch.float32, device="cpu", progress=False)
    sums = {name: _Sums() for name in names}
    bar = tqdm(total=len(names), desc="output errors", unit="layer", file=sys.stderr, disable=not progress,
               leave=False)

    def hook_of(name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            sums[name].add(args[0], module.weight, blocksize)
            bar.update(int(sums[name].calls == 1))
        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_of(name)) for name in names]
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    return {name: sums[name].errors() for name in names if sums[name].calls}
