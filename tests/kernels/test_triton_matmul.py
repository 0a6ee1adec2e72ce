"""The 'triton' linear_4bit / linear_4bit_grad_input: the path rule, the workspace, and the nn layer through them.

Specification: X of 1 row takes the GEMV, 2..SMALL_M_MAX rows the fused kernel, more rows (and fp64, and any call
autograd records) dequantize W into a buffer then call torch's matmul; the result is Y = X W^T + b with W the
reference's dequantized weight. The dense W goes into one reused buffer per (device, dtype, stream), never into
a tensor that autograd saves: a call recorded by autograd gets a fresh W, so a later call cannot change the
gradient. With QLORAKIT_KERNELS=triton, nn.Linear4bit's forward and backward run through these implementations
and match the reference path (exactly where both multiply the same W with torch; within fp32 rounding for the
GEMV and fused kernels). With a workspace cap (set_workspace_limit) below a call's stacked weight,
linear_4bit_cat* go weight by weight: the same Y (bit for bit where the BLAS sums K in the same order), dX within
one extra rounding per weight, a workspace of one weight, and None restores the stacked path.
"""

from __future__ import annotations

import pytest
import torch

from qlorakit import kernels
from qlorakit.kernels import dispatch, triton_matmul
from qlorakit.kernels.triton_dequant import dequantize_4bit_triton
from qlorakit.nn import Linear4bit
from qlorakit.quant.state import dequantize_4bit, quantize_4bit

CPU = torch.device("cpu")


def quantized(n_out: int, k: int, seed: int = 0, blocksize: int = 64):
    gen = torch.Generator().manual_seed(seed)
    return quantize_4bit(torch.randn(n_out, k, generator=gen), blocksize, "nf4", True)


@pytest.fixture
def fresh_workspace():
    triton_matmul.release_workspace()
    yield
    triton_matmul.release_workspace()


def test_every_operation_has_a_triton_implementation():
    assert kernels.TRITON_IMPORT_ERROR is None
    for op in dispatch.OPERATIONS:
        assert "triton" in dispatch._registry[op], op


@pytest.mark.parametrize(
    "rows, dtype, expected",
    [
        (1, torch.bfloat16, "gemv"),
        (1, torch.float32, "gemv"),
        (2, torch.float16, "fused"),
        (triton_matmul.SMALL_M_MAX, torch.bfloat16, "fused"),
        (triton_matmul.SMALL_M_MAX + 1, torch.bfloat16, "dequant_matmul"),
        (4096, torch.bfloat16, "dequant_matmul"),
        (1, torch.float64, "dequant_matmul"),
    ],
)
def test_the_path_rule(rows, dtype, expected):
    assert triton_matmul.plan(rows, dtype) == expected
    assert triton_matmul.plan(rows, dtype, recording=True) == "dequant_matmul"


@pytest.mark.parametrize("lead_shape", [(1,), (1, 1), (2, 3), (4, 5), (21,)], ids=str)
def test_linear_matches_the_reference_for_every_path(fresh_workspace, lead_shape):
    packed, state = quantized(24, 128)
    w = dequantize_4bit(packed, state, torch.float32)
    x = torch.randn(*lead_shape, 128)
    b = torch.randn(24)
    y = triton_matmul.linear_4bit_triton(x, packed, state, b)
    assert y.shape == (*lead_shape, 24)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_grad_input_matches_the_reference(fresh_workspace):
    packed, state = quantized(24, 100)  # K not a multiple of the blocksize
    grad_y = torch.randn(3, 7, 24)
    expected = grad_y @ dequantize_4bit(packed, state, torch.float32)
    assert torch.equal(triton_matmul.linear_4bit_grad_input_triton(grad_y, packed, state), expected)


def test_the_workspace_is_reused_and_grows_once(fresh_workspace):
    small, large = quantized(16, 64), quantized(32, 128, seed=1)
    with torch.no_grad():
        w1 = triton_matmul.dense_weight(*small, torch.float32)
        ptr = w1.data_ptr()
        assert triton_matmul.dense_weight(*quantized(16, 64, seed=2), torch.float32).data_ptr() == ptr
        w2 = triton_matmul.dense_weight(*large, torch.float32)  # grows to the larger weight
        assert torch.equal(w2, dequantize_4bit_triton(*large, torch.float32))
        assert triton_matmul.dense_weight(*small, torch.float32).data_ptr() == w2.data_ptr()
        assert triton_matmul.workspace_bytes() == 32 * 128 * 4
        triton_matmul.dense_weight(*small, torch.bfloat16)  # one buffer per dtype
        assert triton_matmul.workspace_bytes() == 32 * 128 * 4 + 16 * 64 * 2


def test_a_call_recorded_by_autograd_keeps_its_own_weight(fresh_workspace):
    (p1, s1), (p2, s2) = quantized(24, 256, seed=1), quantized(24, 256, seed=2)
    x = torch.randn(20, 256, requires_grad=True)  # 20 rows: the dequantize + matmul path
    y = kernels.call("linear_4bit", x, p1, s1)
    with torch.no_grad():
        kernels.call("linear_4bit", torch.randn(20, 256), p2, s2)  # overwrites the workspace
    grad_y = torch.randn(20, 24)
    y.backward(grad_y)
    assert torch.equal(x.grad, grad_y @ dequantize_4bit(p1, s1, torch.float32))


@pytest.mark.parametrize("lead_shape", [(1, 1), (2, 3), (3, 7)], ids=["gemv", "fused", "dequant-matmul"])
def test_linear4bit_runs_through_triton_and_matches_the_reference(monkeypatch, make_linear_4bit, lead_shape):
    layer = make_linear_4bit()
    calls: list[str] = []
    for op in ("linear_4bit", "linear_4bit_grad_input"):
        impl = dispatch._registry[op]["triton"]

        def spy(*args, _impl=impl, _op=op, **kwargs):
            calls.append(_op)
            return _impl(*args, **kwargs)

        monkeypatch.setitem(dispatch._registry, op, {**dispatch._registry[op], "triton": spy})

    def run(backend: str):
        monkeypatch.setenv("QLORAKIT_KERNELS", backend)
        x = torch.randn(*lead_shape, layer.in_features, generator=torch.Generator().manual_seed(3),
                        requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        return y.detach(), x.grad

    y_ref, gx_ref = run("reference")
    assert calls == []
    monkeypatch.setenv("QLORAKIT_KERNELS", "triton")
    assert kernels.implementation("linear_4bit", CPU)[0] == "triton"
    assert kernels.implementation("linear_4bit_grad_input", CPU)[0] == "triton"
    y, gx = run("triton")
    assert calls == ["linear_4bit", "linear_4bit_grad_input"]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gx, gx_ref)  # both: the same W, then torch's matmul


@pytest.fixture
def make_linear_4bit():
    def make() -> Linear4bit:
        gen = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(96, 40)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(40, 96, generator=gen) * 0.1)
            linear.bias.copy_(torch.randn(40, generator=gen))
        packed, state = quantize_4bit(linear.weight.detach(), 32, "nf4", True)
        return Linear4bit(packed, state, linear.bias.detach())

    return make


# The workspace cap (set_workspace_limit): above it linear_4bit_cat* go weight by weight, the workspace holding
# one dense weight at a time. Bounds below are Higham's: an fp32 accumulation of n terms is off the exact sum by
# at most gamma_n * T, T = sum |terms|, gamma_n = n u / (1 - n u), u = 2^-24; rounding a value v to a dtype of
# unit roundoff u_d moves it by at most u_d |v|. Products of two bf16 values are exact in fp32.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}
CAT_SHAPES = {"2-weights": ((24, 40), 128, (20,)), "3-weights": ((40, 8, 9), 96, (4, 5))}


def gamma32(n: int) -> float:
    u = UNIT_ROUNDOFF[torch.float32]
    return n * u / (1 - n * u)


def quantized_group(ns: tuple[int, ...], k: int, seed: int = 0):
    qs = [quantized(n, k, seed=seed + i) for i, n in enumerate(ns)]
    return [q[0] for q in qs], [q[1] for q in qs]


def stacked_bytes(states, dtype: torch.dtype) -> int:
    return sum(s.numel for s in states) * dtype.itemsize


def largest_bytes(states, dtype: torch.dtype) -> int:
    return max(s.numel for s in states) * dtype.itemsize


@pytest.fixture
def workspace_cap(fresh_workspace):
    """set_workspace_limit, reset to no cap (and the workspace released) after the test."""
    assert triton_matmul.workspace_limit() is None
    try:
        yield triton_matmul.set_workspace_limit
    finally:
        triton_matmul.set_workspace_limit(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(CAT_SHAPES.values()), ids=list(CAT_SHAPES))
def test_capped_cat_forward_equals_the_stacked_forward_bit_for_bit(workspace_cap, shape, dtype):
    """Each element of Y is the same K-term dot product of the same row of X and the same (bit-identical, same
    Triton dequantize) row of W_i in both paths; for K <= 256 the CPU BLAS (MKL sgemm, oneDNN's bf16 kernel)
    reduces it in one fp32 chain whatever the output width, so the per-weight Y is bit-identical."""
    ns, k, lead = shape
    packed, states = quantized_group(ns, k)
    for seed in range(3):
        x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(100 + seed)).to(dtype)
        workspace_cap(None)
        stacked = triton_matmul.linear_4bit_cat_triton(x, packed, states)
        workspace_cap(stacked_bytes(states, dtype) - 1)
        capped = triton_matmul.linear_4bit_cat_triton(x, packed, states)
        assert capped.shape == (*lead, sum(ns)) and capped.dtype == dtype and capped.is_contiguous()
        assert torch.equal(capped, stacked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capped_cat_forward_at_large_k_is_within_two_roundings_of_the_stacked(workspace_cap, dtype):
    """For larger K the CPU BLAS blocks the K reduction by shape (oneDNN's bf16 kernel from K = 512, MKL from
    about 1024), so the stacked [M, sum N_i] and the per-weight [M, N_i] products may add the same K products in
    a different order. Each is an fp32 K-term sum (off the exact dot product by <= gamma_K T) rounded once to
    `dtype` (<= u_d (|exact| + gamma_K T)), so they differ by at most twice that. (Measured on an AVX-512/AMX CPU with
    these shapes: bf16 has about one element in 10^4 one ulp apart, where the two fp32 sums round to neighbouring
    bf16 values; fp32 differs in its last bits in most elements with one thread, in none with two.)"""
    ns, k = (128, 64, 32), 1024
    packed, states = quantized_group(ns, k, seed=7)
    w = torch.cat([dequantize_4bit(p, s, dtype) for p, s in zip(packed, states)]).double()
    for seed in range(2):
        x = torch.randn(128, k, generator=torch.Generator().manual_seed(200 + seed)).to(dtype)
        stacked = triton_matmul.linear_4bit_cat_triton(x, packed, states)
        workspace_cap(stacked_bytes(states, dtype) - 1)
        capped = triton_matmul.linear_4bit_cat_triton(x, packed, states)
        workspace_cap(None)
        exact, terms = x.double() @ w.t(), x.double().abs() @ w.abs().t()
        one = gamma32(k) * terms + UNIT_ROUNDOFF[dtype] * (exact.abs() + gamma32(k) * terms)
        assert ((capped.double() - stacked.double()).abs() <= 2 * one).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(CAT_SHAPES.values()), ids=list(CAT_SHAPES))
def test_capped_cat_grad_input_is_within_one_extra_rounding_per_weight(workspace_cap, shape, dtype):
    """dX = sum over all sum N_i columns of dY_j W_j. Stacked: one fp32 accumulation, rounded once to `dtype`.
    Per-weight: dY[:, cols_0] W_0, then addmm_ adds each further block onto the partial sum, which has been
    rounded to `dtype` after every weight: one extra rounding of the partial sum per weight (w roundings in all,
    each <= u_d |partial| <= u_d T 1.01, T = sum_j |dY_j W_j|), and fp32 accumulations of sum N_i (+ w) terms in
    both, each <= gamma T. So |per-weight - stacked| <= (w + 1) u_d 1.01 T + 2 gamma_{N + w} T."""
    ns, k, lead = shape
    packed, states = quantized_group(ns, k, seed=3)
    w = torch.cat([dequantize_4bit(p, s, dtype) for p, s in zip(packed, states)]).double()
    n = sum(ns)
    for seed in range(3):
        dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(300 + seed)).to(dtype)
        workspace_cap(None)
        stacked = triton_matmul.linear_4bit_cat_grad_input_triton(dy, packed, states)
        workspace_cap(stacked_bytes(states, dtype) - 1)
        capped = triton_matmul.linear_4bit_cat_grad_input_triton(dy, packed, states)
        assert capped.shape == (*lead, k) and capped.dtype == dtype
        terms = dy.double().abs() @ w.abs()
        bound = ((len(ns) + 1) * UNIT_ROUNDOFF[dtype] * 1.01 + 2 * gamma32(n + len(ns))) * terms
        assert ((capped.double() - stacked.double()).abs() <= bound).all()


def test_the_cap_keeps_the_workspace_to_one_weight_and_none_restores_stacking(workspace_cap):
    ns, k, dtype = (40, 8, 9), 96, torch.bfloat16
    packed, states = quantized_group(ns, k)
    x, dy = torch.randn(20, k).to(dtype), torch.randn(20, sum(ns)).to(dtype)

    def call_both():
        triton_matmul.release_workspace()
        y = triton_matmul.linear_4bit_cat_triton(x, packed, states)
        dx = triton_matmul.linear_4bit_cat_grad_input_triton(dy, packed, states)
        return y, dx, triton_matmul.workspace_bytes()

    y_stacked, dx_stacked, nbytes = call_both()
    assert nbytes == stacked_bytes(states, dtype)  # uncapped: the whole [sum N_i, K] stack
    workspace_cap(stacked_bytes(states, dtype))  # a cap the stack fits: still stacked
    assert call_both()[2] == stacked_bytes(states, dtype)
    for cap in (stacked_bytes(states, dtype) - 1, largest_bytes(states, dtype), 0):  # 0: below even one weight
        workspace_cap(cap)
        assert triton_matmul.workspace_limit() == cap
        y, dx, nbytes = call_both()
        assert nbytes == largest_bytes(states, dtype)  # one weight at a time, each through the workspace
        assert torch.equal(y, y_stacked) and dx.shape == dx_stacked.shape
    workspace_cap(None)
    assert triton_matmul.workspace_limit() is None
    y, dx, nbytes = call_both()
    assert nbytes == stacked_bytes(states, dtype) and torch.equal(y, y_stacked) and torch.equal(dx, dx_stacked)


def test_a_single_weight_is_never_split_by_the_cap(workspace_cap):
    packed, states = quantized_group((24,), 64)
    x = torch.randn(20, 64)
    expected = triton_matmul.linear_4bit_cat_triton(x, packed, states)
    workspace_cap(0)
    assert torch.equal(triton_matmul.linear_4bit_cat_triton(x, packed, states), expected)
    assert triton_matmul.workspace_bytes() == 24 * 64 * 4


def test_setting_a_cap_drops_larger_buffers_and_rejects_bad_values(workspace_cap):
    packed, states = quantized_group((24, 40), 64)
    with torch.no_grad():
        triton_matmul.linear_4bit_cat_triton(torch.randn(3, 64), packed, states)
        triton_matmul.dense_weight(packed[0], states[0], torch.bfloat16)
    assert triton_matmul.workspace_bytes() == 64 * 64 * 4 + 24 * 64 * 2
    workspace_cap(40 * 64 * 4)  # the fp32 stack is over it: dropped; the bf16 weight is kept
    assert triton_matmul.workspace_bytes() == 24 * 64 * 2
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="set_workspace_limit"):
            triton_matmul.set_workspace_limit(bad)
    assert triton_matmul.workspace_limit() == 40 * 64 * 4


def test_a_capped_call_recorded_by_autograd_keeps_its_own_weights(workspace_cap):
    """Recorded calls save fresh weights, never the workspace: overwriting the workspace before backward does
    not change the gradients (which are then exactly the per-block products torch's backward computes)."""
    ns, k = (24, 40), 128
    packed, states = quantized_group(ns, k, seed=5)
    ws = [dequantize_4bit(p, s, torch.float32) for p, s in zip(packed, states)]
    other_packed, other_states = quantized_group(ns, k, seed=11)
    workspace_cap(0)
    x = torch.randn(20, k, requires_grad=True)
    y = triton_matmul.linear_4bit_cat_triton(x, packed, states)
    with torch.no_grad():
        assert torch.equal(y, triton_matmul.linear_4bit_cat_triton(x, packed, states))
    dy = torch.randn(20, sum(ns), requires_grad=True)
    dx = triton_matmul.linear_4bit_cat_grad_input_triton(dy, packed, states)
    with torch.no_grad():  # overwrite the workspace with other weights of the same shapes
        triton_matmul.linear_4bit_cat_triton(torch.randn(20, k), other_packed, other_states)
        triton_matmul.linear_4bit_cat_grad_input_triton(torch.randn(20, sum(ns)), other_packed, other_states)
    g, v = torch.randn(20, sum(ns)), torch.randn(20, k)
    y.backward(g)
    dx.backward(v)
    blocks = g.split(list(ns), dim=1)
    expected = blocks[0] @ ws[0] + blocks[1] @ ws[1]
    terms = g.double().abs() @ torch.cat(ws).double().abs()
    assert ((x.grad.double() - expected.double()).abs() <= 2 * gamma32(sum(ns) + 1) * terms).all()
    assert torch.equal(dy.grad, torch.cat([v @ w.t() for w in ws], dim=1))
