"""The dispatched operations as PyTorch custom ops (kernels/ops.py).

Specification: every name in dispatch.OPERATIONS is a custom op `qlorakit::<name>` with a fake implementation;
`kernels.call` reaches it (and only it) with the backends' arguments; `torch.library.opcheck` passes on small
random inputs (schema and declared mutation, autograd registration, fake tensors, AOT dispatch with dynamic
shapes); the fake outputs have the real outputs' shapes, dtypes, strides and devices, on fake and on meta tensors;
the four 4-bit matmuls have autograd formulas (gradcheck), the others refuse a backward clearly; an output that
would alias an input is a copy. The tests run under the backend in force (tests/conftest.py: reference by default,
every Triton kernel under `--kernel-backend triton`, interpreted on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from qlorakit import kernels
from qlorakit.kernels import dispatch, ops
from qlorakit.quant.state import quantize_4bit


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _weight(n: int, k: int, quant_type: str, double_quant: bool, blocksize: int = 64, seed: int = 1):
    return quantize_4bit(_rand(n, k, seed=seed), blocksize, quant_type, double_quant)


def _group():
    """Two weights on one input, as the fused Q/K/V group holds them: NF4 double quantized, FP4 plain."""
    (p1, s1), (p2, s2) = _weight(8, 64, "nf4", True), _weight(6, 64, "fp4", False, blocksize=32, seed=2)
    return [p1, p2], [s1, s2]


def _rope(b: int, s: int, heads: int, kv: int, d: int, dtype: torch.dtype = torch.float32):
    return (_rand(b, s, (heads + 2 * kv) * d, dtype=dtype), _rand(1, s, d, dtype=dtype, seed=1),
            _rand(1, s, d, dtype=dtype, seed=2), heads, kv, d)


def _rms(dtype: torch.dtype):
    x, w = _rand(4, 32, dtype=dtype), _rand(32, seed=1)
    return x, w, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)


# Operation -> samples: functions returning fresh arguments as callers pass them to kernels.call.
SAMPLES: dict[str, list[Callable[[], tuple]]] = {
    "dequantize_4bit": [lambda: (*_weight(8, 64, "nf4", True), torch.float32),
                        lambda: (*_weight(5, 7, "fp4", False, blocksize=32), torch.bfloat16)],
    "quantize_4bit": [lambda: (_rand(8, 64), 64, "nf4", True),
                      lambda: (_rand(5, 7, dtype=torch.bfloat16), 32, "fp4", False)],
    "linear_4bit": [lambda: (_rand(3, 64), *_weight(8, 64, "nf4", True), None),
                    lambda: (_rand(2, 1, 64).requires_grad_(), *_weight(6, 64, "fp4", False, blocksize=32),
                             _rand(6, seed=3).requires_grad_())],
    "linear_4bit_grad_input": [lambda: (_rand(3, 8).requires_grad_(), *_weight(8, 64, "nf4", True))],
    "linear_4bit_cat": [lambda: (_rand(4, 64).requires_grad_(), *_group())],
    "linear_4bit_cat_grad_input": [lambda: (_rand(4, 14), *_group())],
    "rms_norm": [lambda: (_rand(4, 32), _rand(32, seed=1), 1e-6),
                 lambda: (_rand(3, 16, dtype=torch.bfloat16), _rand(16, seed=1), 1e-5)],
    "rms_norm_backward": [lambda: (_rand(4, 32, seed=2), *_rms(torch.float32)),
                          lambda: (_rand(4, 32, dtype=torch.bfloat16, seed=2), *_rms(torch.bfloat16))],
    "swiglu": [lambda: (_rand(3, 16),), lambda: (_rand(2, 10, dtype=torch.bfloat16),)],
    "swiglu_backward": [lambda: (_rand(3, 8, seed=1), _rand(3, 16))],
    "cross_entropy_grad": [lambda: (_rand(4, 20), torch.tensor([0, 19, 7, 3])),
                           lambda: (_rand(2, 9, dtype=torch.bfloat16), torch.tensor([8, 0]))],
    "qkv_rope": [lambda: _rope(2, 3, 2, 1, 8),
                 lambda: _rope(1, 1, 2, 1, 4, torch.bfloat16)],  # B = S = 1: the reference returns views of qkv
    "qkv_rope_backward": [lambda: (_rand(2, 2, 3, 8), _rand(2, 1, 3, 8, seed=1), _rand(2, 1, 3, 8, seed=2),
                                   _rand(1, 3, 8, seed=3), _rand(1, 3, 8, seed=4))],
}
CASES = [pytest.param(op, i, id=f"{op}-{i}") for op, samples in SAMPLES.items() for i in range(len(samples))]


class _Capture(TorchDispatchMode):
    """Records every qlorakit op that runs under it, with the arguments it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "qlorakit":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _op_call(op: str, i: int) -> tuple[torch._ops.OpOverload, tuple, dict]:
    """The custom op that kernels.call(op, *sample) runs, and the op-level arguments it passes."""
    with _Capture() as seen:
        kernels.call(op, *SAMPLES[op][i]())
    assert [f.name() for f, _, _ in seen.calls] == [f"qlorakit::{op}"]
    return seen.calls[0]


def _fresh(args: tuple) -> tuple:
    """A copy of the arguments (same requires_grad), so that mutating ops get inputs of their own."""
    def copy(t):
        return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
    return tree_map(copy, args)


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_every_operation_is_a_custom_op_with_a_fake_and_samples():
    assert set(SAMPLES) == set(dispatch.OPERATIONS) == set(ops.WRAPPERS)
    for op in dispatch.OPERATIONS:
        overload = getattr(torch.ops.qlorakit, op).default
        assert overload.name() == f"qlorakit::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(overload.name(), "Meta"), op  # register_fake
    mutated = {op: [a.name for a in getattr(torch.ops.qlorakit, op).default._schema.arguments
                    if a.alias_info is not None and a.alias_info.is_write] for op in dispatch.OPERATIONS}
    assert {op: names for op, names in mutated.items() if names} == {"cross_entropy_grad": ["logits"]}


@pytest.mark.parametrize("op, i", CASES)
def test_opcheck(op, i):
    overload, args, kwargs = _op_call(op, i)
    torch.library.opcheck(overload, _fresh(args), kwargs)


@pytest.mark.parametrize("op, i", CASES)
def test_fake_outputs_have_the_real_outputs_metadata(op, i):
    overload, args, kwargs = _op_call(op, i)
    real = _outputs(overload(*_fresh(args), **kwargs))
    mode = FakeTensorMode()
    fake_args = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, _fresh(args))
    with mode:
        fake = _outputs(overload(*fake_args, **kwargs))
    meta = _outputs(overload(*tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t,
                                       _fresh(args)), **kwargs))
    assert len(real) == len(fake) == len(meta)
    for r, f, m in zip(real, fake, meta):
        assert (f.shape, f.dtype, f.device, f.stride()) == (r.shape, r.dtype, r.device, r.stride())
        assert (m.shape, m.dtype, m.stride(), m.device.type) == (r.shape, r.dtype, r.stride(), "meta")


def test_kernels_call_returns_what_the_backend_returns():
    """The wrappers repack the op's tensors into the backends' results: a QuantState whose every field is the
    backend's, and the op's outputs as the backend gives them (bit for bit)."""
    x = _rand(5, 7, dtype=torch.bfloat16)
    backend = dispatch.implementation("quantize_4bit", x.device)[1]
    for double_quant in (True, False):
        packed, state = kernels.call("quantize_4bit", x, 32, "fp4", double_quant)
        want_packed, want = backend(x, 32, "fp4", double_quant)
        assert torch.equal(packed, want_packed)
        assert (state.shape, state.dtype, state.blocksize, state.quant_type) == (
            want.shape, want.dtype, want.blocksize, want.quant_type)
        assert torch.equal(state.code, want.code)
        if double_quant:
            n, w = state.nested, want.nested
            assert state.absmax is None and n.blocksize == w.blocksize
            for a, b in ((n.quantized, w.quantized), (n.absmax, w.absmax), (n.offset, w.offset), (n.code, w.code)):
                assert torch.equal(a, b)
        else:
            assert state.nested is None and torch.equal(state.absmax, want.absmax)
    packed, states = _group()
    xs = _rand(4, 64)
    impl = dispatch.implementation("linear_4bit_cat", xs.device)[1]
    assert torch.equal(kernels.call("linear_4bit_cat", xs, packed, states), impl(xs, packed, states))


@pytest.mark.parametrize("op", ["linear_4bit", "linear_4bit_grad_input", "linear_4bit_cat",
                                "linear_4bit_cat_grad_input"])
def test_the_4bit_matmuls_have_autograd_formulas(op):
    """gradcheck in fp64. Each op is linear in its tensor inputs, so central differences are exact up to fp64
    rounding of terms of size ~|x||W| ~ 10 over a step of 1e-6, i.e. ~1e-9: far inside gradcheck's atol 1e-5."""
    if op.startswith("linear_4bit_cat"):
        packed, states = _group()
        rows = 14 if op.endswith("grad_input") else 64

        def f(t):
            return kernels.call(op, t, packed, states)
        inputs = (_rand(3, rows, dtype=torch.float64).requires_grad_(),)
    else:
        packed, state = _weight(8, 64, "nf4", True)
        if op == "linear_4bit":
            def f(t, bias):
                return kernels.call(op, t, packed, state, bias)
            inputs = (_rand(3, 64, dtype=torch.float64).requires_grad_(),
                      _rand(8, dtype=torch.float64, seed=4).requires_grad_())
        else:
            def f(t):
                return kernels.call(op, t, packed, state)
            inputs = (_rand(3, 8, dtype=torch.float64).requires_grad_(),)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_an_op_without_a_formula_refuses_backward_clearly():
    gu = _rand(3, 16).requires_grad_()
    y = kernels.call("swiglu", gu)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        y.sum().backward()


def test_outputs_never_alias_the_inputs():
    qkv, cos, sin, heads, kv, d = _rope(1, 1, 2, 1, 4)
    storage = qkv.untyped_storage().data_ptr()
    for t in kernels.call("qkv_rope", qkv, cos, sin, heads, kv, d):
        assert t.untyped_storage().data_ptr() != storage


def test_the_wrappers_trace_into_one_graph():
    """torch.compile sees each op as one call: the QuantState is unpacked in Python that dynamo follows, and
    nothing breaks the graph (fullgraph=True fails on a break)."""
    packed, state = _weight(8, 64, "nf4", True)
    w = _rand(64, seed=5)

    def block(x):
        y, _ = kernels.call("rms_norm", x, w, 1e-6)
        return kernels.call("swiglu", kernels.call("linear_4bit", y, packed, state))

    x = _rand(3, 64)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), block(x))
