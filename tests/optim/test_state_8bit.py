"""8-bit state rounding: exact nearest map entry, zeros, and the error bound that follows."""

from __future__ import annotations

import torch

from qlorakit.optim.state_8bit import dequantize_state, nearest_index, quantize_state, state_maps

CPU = torch.device("cpu")


def test_nearest_index_is_the_nearest_entry_ties_going_low():
    maps = state_maps(CPU)
    for code, mid in ((maps.signed, maps.signed_mid), (maps.unsigned, maps.unsigned_mid)):
        g = torch.Generator().manual_seed(0)
        lo = float(code.min())
        x = torch.cat([
            torch.empty(20000).uniform_(lo, 1.0, generator=g),
            torch.sign(torch.randn(20000, generator=g)) * 10 ** torch.empty(20000).uniform_(-8, 0, generator=g),
            code, mid, torch.tensor([0.0, -0.0, 1.0, lo]),
        ]).clamp(lo, 1.0)
        got = nearest_index(x, mid).long()
        # The nearest entry in exact arithmetic (ties to the lower entry: argmin takes the first).
        best = (x.double()[:, None] - code.double()[None, :]).abs().argmin(dim=1)
        differ = got != best
        # They may differ only where x lies within rounding of the exact midpoint (the midpoints are fp32).
        lower = torch.minimum(got, best)
        exact_mid = (code.double()[lower] + code.double()[(lower + 1).clamp(max=255)]) / 2
        assert bool(((x.double() - exact_mid).abs()[differ] <= 2**-23 * x.double().abs()[differ]).all())
        assert differ[:40000].float().mean() < 1e-3  # on random values, a rare event
        # A value exactly on an fp32 midpoint takes the lower entry.
        on_mid = torch.isin(x, mid)
        assert bool((code[got[on_mid]] < x[on_mid]).all())
        # Map entries map to themselves.
        assert torch.equal(code[nearest_index(code, mid).long()], code)


def test_zero_moments_encode_as_zero_with_zero_absmax():
    maps = state_maps(CPU)
    q, a = quantize_state(torch.zeros(700), maps.signed, maps.signed_mid, 256)
    assert torch.equal(a, torch.zeros(3)) and bool((q == maps.signed_zero).all())
    assert maps.signed[maps.signed_zero] == 0
    q, a = quantize_state(torch.zeros(10), maps.unsigned, maps.unsigned_mid, 256)
    assert bool((q == 0).all()) and maps.unsigned[0] == 0
    assert torch.equal(dequantize_state(q, a, maps.unsigned, 256), torch.zeros(10))


def test_round_trip_error_is_at_most_half_a_gap_of_the_map_per_block():
    # Except below the signed map's lowest entry: it has 1.0 but not -1.0, so a block whose extreme is negative
    # stores that extreme as -0.99297 x absmax (0.7% smaller), as bitsandbytes' map does.
    maps = state_maps(CPU)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=g) * torch.linspace(1e-6, 1.0, 5000)  # blocks of very different scales
    q, a = quantize_state(x, maps.signed, maps.signed_mid, 256)
    back = dequantize_state(q, a, maps.signed, 256)
    blocks = torch.arange(5000) // 256
    normed = x / a[blocks]
    gaps = torch.diff(maps.signed)
    pos = torch.bucketize(normed, maps.signed).clamp(1, 255)
    half_gap = gaps[pos - 1] / 2
    inside = normed >= maps.signed[0]
    assert bool(((back - x).abs() <= half_gap * a[blocks] * (1 + 1e-6) + 1e-30)[inside].all())
    assert torch.equal(back[~inside], maps.signed[0] * a[blocks][~inside])
    assert torch.equal(a, torch.nn.functional.pad(x, (0, 120)).view(-1, 256).abs().amax(1))  # absmax exact, fp32


def test_a_tail_block_shorter_than_the_block_size_has_its_own_absmax():
    maps = state_maps(CPU)
    x = torch.cat([torch.full((256,), 2.0), torch.full((5,), -0.5)])
    q, a = quantize_state(x, maps.signed, maps.signed_mid, 256)
    assert torch.equal(a, torch.tensor([2.0, 0.5]))
    assert torch.equal(dequantize_state(q, a, maps.signed, 256)[256:], torch.full((5,), maps.signed[0] * 0.5))
