"""Quantization error on N(0, 1) weights at blocksize 64: NF4 beats FP4 and absmax-linear INT4.

`pytest -s` prints the numbers; with QLORAKIT_WRITE_RESULTS=<folder> set they are also written to
<folder>/quant_error_normal_bs64.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qlorakit.quant import code_int4_symmetric, dequantize_4bit, quantize_4bit

N_SAMPLES = 2**20
BLOCKSIZE = 64
SEED = 0


def int4_absmax_linear_roundtrip(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Reference INT4 for comparison: the same blockwise absmax scaling as NF4/FP4 (fp32 reciprocal of each
    block's absmax), then round to the nearest of the 15 levels k/7 of code_int4_symmetric(), then scale back.

    x: fp32 [n] with n a multiple of blocksize. Returns fp32 [n].
    """
    blocks = x.reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))
    levels = code_int4_symmetric()
    k = torch.round(scaled * 7).clamp(-7, 7).long()  # index k + 7 into the 15 levels
    return (levels[k + 7] * absmax).reshape(-1)


@pytest.fixture(scope="module")
def normal_weights() -> torch.Tensor:
    return torch.randn(N_SAMPLES, generator=torch.Generator().manual_seed(SEED))


@pytest.fixture(scope="module")
def errors(normal_weights) -> dict[str, dict[str, float]]:
    x = normal_weights
    restored = {"int4": int4_absmax_linear_roundtrip(x, BLOCKSIZE)}
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(x, BLOCKSIZE, quant_type, double_quant=False)
        restored[quant_type] = dequantize_4bit(packed, state)
        packed, state = quantize_4bit(x, BLOCKSIZE, quant_type, double_quant=True)
        restored[f"{quant_type}+dq"] = dequantize_4bit(packed, state)
    return {
        name: {"mse": (y - x).pow(2).mean().item(), "mean_abs_error": (y - x).abs().mean().item()}
        for name, y in restored.items()
    }


def test_int4_reference_helper_rounds_to_the_nearest_level():
    x = torch.tensor([1.0, -1.0, 0.5, 0.07, 0.08, -0.3] + [0.0] * 58)
    y = int4_absmax_linear_roundtrip(x, 64)
    assert y[:6].tolist() == pytest.approx([1.0, -1.0, 4 / 7, 0.0, 1 / 7, -2 / 7])


def test_nf4_has_the_lowest_error_on_normal_weights(errors):
    print(f"\nquantization error, N(0,1), {N_SAMPLES} samples, blocksize {BLOCKSIZE}, seed {SEED}:")
    for name, e in errors.items():
        print(f"  {name:7s} mse {e['mse']:.6f}  mean abs error {e['mean_abs_error']:.6f}")
    if os.environ.get("QLORAKIT_WRITE_RESULTS"):
        folder = Path(os.environ["QLORAKIT_WRITE_RESULTS"])
        folder.mkdir(parents=True, exist_ok=True)
        setup = {"distribution": "normal(0,1)", "samples": N_SAMPLES, "blocksize": BLOCKSIZE, "seed": SEED}
        (folder / "quant_error_normal_bs64.json").write_text(json.dumps({**setup, "errors": errors}, indent=2))
    for metric in ("mse", "mean_abs_error"):
        assert errors["nf4"][metric] < errors["int4"][metric] < errors["fp4"][metric]
    # Measured with seed 0: NF4 0.008458, INT4 0.011596, FP4 0.014863 (MSE). The ordering is the claim; the
    # values are pinned loosely so that a broken codebook or scaling cannot pass.
    assert errors["nf4"]["mse"] == pytest.approx(0.00846, rel=0.01)
    assert errors["fp4"]["mse"] == pytest.approx(0.01486, rel=0.01)
    assert errors["int4"]["mse"] == pytest.approx(0.01160, rel=0.01)


def test_double_quantization_costs_little_accuracy(errors):
    # Measured: +0.07% MSE for NF4, +0.03% for FP4.
    for quant_type in ("nf4", "fp4"):
        assert errors[f"{quant_type}+dq"]["mse"] < 1.005 * errors[quant_type]["mse"]
