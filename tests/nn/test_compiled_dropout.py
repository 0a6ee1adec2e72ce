"""The fused LoRA functions under torch.compile, with LoRA dropout (nn/dropout_draws.py, kernels/dropout_ops.py).

Specification: dynamo traces one fused decoder layer (Q/K/V group with its RMSNorm, RoPE, attention, o_proj,
SwiGLU MLP with its RMSNorm) forward and backward without a graph break, with dropout 0 and with dropout > 0;
compiled, the layer draws the masks that eager execution draws from the same generator state (so its output and
gradients equal eager's, here exactly: the reference kernels, fp32, AOT autograd without inductor) and leaves the
generator where eager leaves it; draws of different adapters on one input stay different masks under AOT
autograd's common-subexpression pass; eager execution never enters the dropout ops.
"""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from test_fused_blocks import TINY, tiny_model
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from qlorakit.model.fused_blocks import enable_fused_blocks

# The partitioner inductor uses (it runs the common-subexpression pass), without inductor's code generation: the
# compiled graphs run the same aten ops as eager, so results compare exactly.
MIN_CUT = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                       partition_fn=min_cut_rematerialization_partition)


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The reference kernels also in the `--kernel-backend triton` run (the Triton kernels interpreted inside a
    compiled graph would take minutes; they are compared with the reference in tests/kernels), dynamo's caches
    emptied, the global generator's state kept."""
    monkeypatch.setenv("QLORAKIT_KERNELS", "reference")
    torch._dynamo.reset()
    with torch.random.fork_rng(devices=[]):  # the global generator given back as found, for the tests after these
        yield
    torch._dynamo.reset()


def _layer(dropout: float, fused: bool = True):
    model = tiny_model(dropout=dropout)
    if fused:
        enable_fused_blocks(model)
    layer = model.model.layers[0]
    x = torch.randn(2, 12, TINY["hidden_size"], generator=torch.Generator().manual_seed(5)).requires_grad_()
    position_ids = torch.arange(12).expand(2, 12)
    cos_sin = model.model.rotary_emb(x, position_ids)

    def forward(h):
        return layer(h, position_ids=position_ids, position_embeddings=cos_sin)

    return forward, x, [p for p in layer.parameters() if p.requires_grad]


def _step(forward, x, params, seed: int = 11):
    """Output, d x and the LoRA gradients of one forward + backward from generator seed `seed`, and the
    generator's state afterwards."""
    for t in (x, *params):
        t.grad = None
    torch.manual_seed(seed)
    out = forward(x)
    out.backward(torch.ones_like(out))
    return [out.detach(), x.grad.clone(), *(p.grad.clone() for p in params)], torch.get_rng_state()


def _ops(explained) -> set[str]:
    return {n.target.name() for g in explained.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "qlorakit"}


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_a_fused_decoder_layer_traces_without_graph_breaks(dropout):
    forward, x, _ = _layer(dropout)
    explained = torch._dynamo.explain(forward)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = _ops(explained)
    assert {"qlorakit::linear_4bit_cat", "qlorakit::linear_4bit_cat_grad_input", "qlorakit::swiglu_backward",
            "qlorakit::rms_norm_backward", "qlorakit::qkv_rope_backward"} <= ops  # backward subgraphs too
    drawn = {"qlorakit::dropout_draw", "qlorakit::dropout_replay"}
    assert (drawn <= ops) if dropout else not (drawn & ops)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-blocks", "one-function-per-projection"])
def test_compiled_dropout_draws_the_eager_masks(fused):
    """fused-blocks: the Q/K/V group, o_proj, the SwiGLU MLP. one-function-per-projection: q, k and v are three
    fused LoRA functions on the same input, whose three draws the common-subexpression pass would merge into one
    if their arguments were equal."""
    forward, x, params = _layer(0.2, fused)
    want, state = _step(forward, x, params)
    compiled = torch.compile(forward, backend=MIN_CUT, fullgraph=True)
    got, compiled_state = _step(compiled, x, params)
    assert torch.equal(compiled_state, state)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    other, _ = _step(forward, x, params, seed=12)
    assert not torch.equal(other[0], want[0])  # the masks matter: another seed gives another output


def test_the_mlp_recomputing_gate_up_replays_the_masks_when_compiled():
    from qlorakit.nn.lora_blocks import Projection, lora_swiglu_4bit

    model = tiny_model(dropout=0.2)
    mlp = model.model.layers[0].mlp
    projections = [Projection(m.base_layer.weight, m.base_layer.quant_state, None, m.scaling)
                   for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    adapters = [(m.lora_A.weight, m.lora_B.weight) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    params = [t for pair in adapters for t in pair]
    x = torch.randn(10, TINY["hidden_size"], generator=torch.Generator().manual_seed(2)).requires_grad_()

    def forward(h):
        return lora_swiglu_4bit(h, *projections, adapters, 0.2, True, keep_gate_up=False)

    want, _ = _step(forward, x, params)
    got, _ = _step(torch.compile(forward, backend=MIN_CUT, fullgraph=True), x, params)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_eager_draws_never_enter_the_dropout_ops():
    forward, x, params = _layer(0.2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(forward, x, params)
    assert not [e.name for e in prof.events() if e.name.startswith("qlorakit::")]
