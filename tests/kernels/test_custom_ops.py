"""The dispatched operations as PyTorch custom ops (kernels/ops.py).

Specification: every name in dispatch.OPERATIONS is a custom op `qlorakit::<name>` with a fake implementation,
and so are the LoRA dropout draw and replay (kernels/dropout_ops.py); in eager execution `kernels.call` calls the
backend directly and never enters the custom-op layer, while tracing (make_fx, FakeTensorMode, torch.compile,
torch.export) it reaches the op (and only it) with the backends' arguments; `torch.library.opcheck` passes on small
random inputs (schema and declared mutation, autograd registration, fake tensors, AOT dispatch with dynamic
shapes); the fake outputs have the real outputs' shapes, dtypes, strides and devices, on fake and on meta tensors;
the four 4-bit matmuls have autograd formulas (gradcheck), the others refuse a backward clearly; an output that
would alias an input is a copy; the dropout replay draws the draw's mask again. The tests run under the backend in
force (tests/conftest.py: reference by default, every Triton kernel under `--kernel-backend triton`, interpreted on
the CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from qlorakit import kernels
from qlorakit.kernels import dispatch, ops
from qlorakit.quant.state import quantize_4bit


@pytest.fixture(autouse=True)
def own_generator_state():
    """The dropout ops draw from the global generator: each test here gives it back as it found it, so tests that
    run later see the stream they would see without these."""
    with torch.random.fork_rng(devices=[]):
        yield


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
# The dropout ops (not dispatched: no backend choice), called directly with op-level arguments.
DROPOUT_SAMPLES: dict[str, list[Callable[[], tuple]]] = {
    "dropout_draw": [lambda: (_rand(4, 16), 0.3, _rand(2, 16, seed=1), None),
                     lambda: (_rand(3, 8, dtype=torch.bfloat16), 0.5, _rand(2, 8, seed=1), torch.get_rng_state())],
    "dropout_replay": [lambda: (_rand(4, 16), 0.3, torch.get_rng_state()),
                       lambda: (_rand(3, 8, dtype=torch.bfloat16), 0.05, torch.get_rng_state())],
}
DROPOUT_CASES = [pytest.param(op, i, id=f"{op}-{i}") for op, samples in DROPOUT_SAMPLES.items()
                 for i in range(len(samples))]


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
    """The custom op that kernels.call(op, *sample) runs while traced (here: under a dispatch mode), and the
    op-level arguments it passes."""
    if op in DROPOUT_SAMPLES:
        return getattr(torch.ops.qlorakit, op).default, DROPOUT_SAMPLES[op][i](), {}
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
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("qlorakit::")}
    assert registered == {f"qlorakit::{op}" for op in (*SAMPLES, *DROPOUT_SAMPLES)}  # every op has opcheck samples
    for op in (*dispatch.OPERATIONS, *DROPOUT_SAMPLES):
        overload = getattr(torch.ops.qlorakit, op).default
        assert overload.name() == f"qlorakit::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(overload.name(), "Meta"), op  # register_fake
    mutated = {op: [a.name for a in getattr(torch.ops.qlorakit, op).default._schema.arguments
                    if a.alias_info is not None and a.alias_info.is_write] for op in (*SAMPLES, *DROPOUT_SAMPLES)}
    assert {op: names for op, names in mutated.items() if names} == {"cross_entropy_grad": ["logits"]}
    assert torch.Tag.nondeterministic_seeded in torch.ops.qlorakit.dropout_draw.default.tags


@pytest.mark.parametrize("op, i", CASES + DROPOUT_CASES)
def test_opcheck(op, i):
    overload, args, kwargs = _op_call(op, i)
    torch.library.opcheck(overload, _fresh(args), kwargs)


@pytest.mark.parametrize("op, i", CASES + DROPOUT_CASES)
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
    for j, (r, f, m) in enumerate(zip(real, fake, meta)):
        assert (f.shape, f.dtype, f.device, f.stride()) == (r.shape, r.dtype, r.device, r.stride())
        device = "cpu" if (op, j) == ("dropout_draw", 1) else "meta"  # a generator state is a CPU tensor
        assert (m.shape, m.dtype, m.stride(), m.device.type) == (r.shape, r.dtype, r.stride(), device)


@pytest.mark.parametrize("op, i", CASES)
def test_eager_calls_never_enter_the_custom_ops(op, i, monkeypatch):
    """Eager kernels.call runs the backend directly, as before the operations were custom ops: no op body runs
    (every body asks ops._backend) and the profiler records no qlorakit op; the op's wrapper, run as the control,
    enters both. The result is the backend's, bit for bit."""
    entered: list[str] = []
    backend = ops._backend
    monkeypatch.setattr(ops, "_backend", lambda name, first: entered.append(name) or backend(name, first))

    def profiled(fn) -> tuple[object, list[str]]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fn(*SAMPLES[op][i]())
        return out, [e.name for e in prof.events() if e.name.startswith("qlorakit::")]

    eager, names = profiled(lambda *a: kernels.call(op, *a))
    assert entered == [] and names == []
    direct = dispatch.implementation(op, torch.device("cpu"))[1](*SAMPLES[op][i]())
    for got, want in zip(_flat(eager), _flat(direct)):
        assert torch.equal(got, want)
    _, names = profiled(ops.WRAPPERS[op])
    assert entered == [op] and names == [f"qlorakit::{op}"]


def _flat(out) -> list[torch.Tensor]:
    """The tensors of a backend's result (a QuantState's too), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in _flat(getattr(out, f.name))]
    return []


def test_the_op_wrappers_return_what_the_backend_returns():
    """The wrappers (the traced path of kernels.call) repack the op's tensors into the backends' results: a
    QuantState whose every field is the backend's, and the op's outputs as the backend gives them (bit for bit)."""
    x = _rand(5, 7, dtype=torch.bfloat16)
    backend = dispatch.implementation("quantize_4bit", x.device)[1]
    for double_quant in (True, False):
        packed, state = ops.quantize_4bit(x, 32, "fp4", double_quant)
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
    assert torch.equal(ops.linear_4bit_cat(xs, packed, states), impl(xs, packed, states))


@pytest.mark.parametrize("op", ["linear_4bit", "linear_4bit_grad_input", "linear_4bit_cat",
                                "linear_4bit_cat_grad_input"])
def test_the_4bit_matmuls_have_autograd_formulas(op):
    """gradcheck of the ops (their wrappers: the traced path; eager kernels.call differentiates the backend) in
    fp64. Each op is linear in its tensor inputs, so central differences are exact up to fp64
    rounding of terms of size ~|x||W| ~ 10 over a step of 1e-6, i.e. ~1e-9: far inside gradcheck's atol 1e-5."""
    if op.startswith("linear_4bit_cat"):
        packed, states = _group()
        rows = 14 if op.endswith("grad_input") else 64

        def f(t):
            return ops.WRAPPERS[op](t, packed, states)
        inputs = (_rand(3, rows, dtype=torch.float64).requires_grad_(),)
    else:
        packed, state = _weight(8, 64, "nf4", True)
        if op == "linear_4bit":
            def f(t, bias):
                return ops.WRAPPERS[op](t, packed, state, bias)
            inputs = (_rand(3, 64, dtype=torch.float64).requires_grad_(),
                      _rand(8, dtype=torch.float64, seed=4).requires_grad_())
        else:
            def f(t):
                return ops.WRAPPERS[op](t, packed, state)
            inputs = (_rand(3, 8, dtype=torch.float64).requires_grad_(),)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_an_op_without_a_formula_refuses_backward_clearly():
    gu = _rand(3, 16).requires_grad_()
    y = ops.swiglu(gu)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        y.sum().backward()


def test_outputs_never_alias_the_inputs():
    qkv, cos, sin, heads, kv, d = _rope(1, 1, 2, 1, 4)
    storage = qkv.untyped_storage().data_ptr()
    for t in ops.qkv_rope(qkv, cos, sin, heads, kv, d):
        assert t.untyped_storage().data_ptr() != storage


def _qlorakit_ops(gm: torch.fx.GraphModule) -> list[str]:
    """The qlorakit ops that a graph calls, in order (subgraphs of autograd functions included)."""
    return [n.target.name() for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
            if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "qlorakit"]


def test_traced_calls_record_the_custom_ops():
    """Under make_fx (real and fake tensors), torch.compile, torch._dynamo.explain and torch.export, kernels.call
    goes through the custom ops: each graph holds the three qlorakit ops as calls (the QuantState unpacked in Python
    that dynamo follows, no graph break: fullgraph=True fails on one), and the compiled block computes what eager
    kernels.call computes."""
    packed, state = _weight(8, 64, "nf4", True)
    w = _rand(64, seed=5)
    want = ["qlorakit::rms_norm", "qlorakit::linear_4bit", "qlorakit::swiglu"]

    def block(x):
        y, _ = kernels.call("rms_norm", x, w, 1e-6)
        return kernels.call("swiglu", kernels.call("linear_4bit", y, packed, state))

    x = _rand(3, 64)
    for mode in ("real", "fake"):  # (the weights are closed over: real tensors inside the fake trace)
        assert _qlorakit_ops(make_fx(block, tracing_mode=mode, _allow_non_fake_inputs=True)(x)) == want, mode
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=capture, fullgraph=True)
    assert torch.equal(compiled(x), block(x))
    assert len(graphs) == 1 and _qlorakit_ops(graphs[0]) == want
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0
    assert _qlorakit_ops(explained.graphs[0]) == want

    class Block(torch.nn.Module):
        def forward(self, x):
            return block(x)

    exported = torch.export.export(Block(), (x,))
    assert _qlorakit_ops(exported.graph_module) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_dropout_replay_draws_the_mask_of_the_draw_again(dtype):
    """dropout_draw draws what torch.native_dropout draws from the same generator state and returns that state;
    dropout_replay from it gives the same output and its mask, and leaves the generator where it was."""
    x = _rand(6, 40, dtype=dtype)
    torch.manual_seed(3)
    want, want_mask = torch.native_dropout(x, 0.3, True)
    torch.manual_seed(3)
    x_drop, state = kernels.dropout_draw(x, 0.3, x, None)
    after = torch.get_rng_state()
    assert torch.equal(x_drop, want) and state.dtype == torch.uint8
    again, mask = kernels.dropout_replay(x, 0.3, state)
    assert torch.equal(again, want) and torch.equal(mask, want_mask) and not mask.all()
    assert torch.equal(torch.get_rng_state(), after)
