"""Codebooks: NF4, FP4, symmetric INT4 and the 8-bit dynamic maps, bit for bit against bitsandbytes."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from qlorakit.errors import QuantizationError
from qlorakit.quant import NF4_VALUES, code_4bit, code_int4_symmetric, dynamic_map

# The NF4 codebook as written in DESIGN.md, section "Formats" (code 0..15).
DESIGN_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def test_nf4_is_the_literal_codebook_of_the_design():
    nf4 = code_4bit("nf4")
    assert nf4.dtype == torch.float32 and nf4.shape == (16,)
    assert torch.equal(nf4, torch.tensor(DESIGN_NF4, dtype=torch.float32))
    assert NF4_VALUES == DESIGN_NF4


def test_nf4_is_sorted_with_zero_at_code_7_and_ends_at_plus_minus_one():
    nf4 = code_4bit("nf4")
    assert torch.equal(nf4, nf4.sort().values)
    assert nf4[7].item() == 0.0 and nf4[0].item() == -1.0 and nf4[15].item() == 1.0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codebook_equals_bitsandbytes(quant_type):
    assert torch.equal(code_4bit(quant_type), bnbf.get_4bit_type(quant_type, device="cpu"))


def test_fp4_is_sign_magnitude_with_bit_3_as_sign():
    fp4 = code_4bit("fp4")
    assert torch.equal(fp4[8:], -fp4[:8])
    assert fp4.abs().max().item() == 1.0
    # Both zero codes hold +0.0: bitsandbytes builds its table from the Python int -0, which has no sign.
    assert fp4[0].item() == 0.0 and fp4[8].item() == 0.0
    assert not torch.signbit(fp4[8])


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    ours = dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, bnbf.create_dynamic_map(signed=signed))


def test_dynamic_map_ranges():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    assert torch.equal(signed, signed.sort().values) and torch.equal(unsigned, unsigned.sort().values)
    assert signed[-1].item() == 1.0 and -0.9930 < signed[0].item() < -0.9929
    assert unsigned[0].item() == 0.0 and unsigned[-1].item() == 1.0


def test_int4_symmetric_is_fifteen_levels_k_over_7():
    levels = code_int4_symmetric()
    assert torch.equal(levels, torch.arange(-7, 8, dtype=torch.float32) / 7)


def test_codebooks_are_fresh_copies():
    # A caller (or a kernel that writes into its code argument) must not corrupt the cached tables.
    code_4bit("nf4")[0] = 5.0
    dynamic_map(True)[0] = 5.0
    code_int4_symmetric()[0] = 5.0
    assert code_4bit("nf4")[0].item() == -1.0
    assert dynamic_map(True)[0].item() != 5.0
    assert code_int4_symmetric()[0].item() == -1.0


def test_code_4bit_on_a_device():
    assert code_4bit("fp4", "cpu").device.type == "cpu"


@pytest.mark.parametrize("bad", ["int4", "NF4", "af4", ""])
def test_unknown_4bit_codebook_is_refused(bad):
    with pytest.raises(QuantizationError, match=f"{bad!r}.*nf4, fp4"):
        code_4bit(bad)
