"""The dispatch seam: QLORAKIT_KERNELS picks, per call, which implementation computes each operation.

Specification: `reference` always takes the plain-PyTorch reference; `triton` always takes Triton and is a
clear error for an operation without a Triton implementation; `auto` takes Triton only for CUDA tensors and
says once per operation when it cannot; any other value is an error that names the allowed values.
No GPU is needed: the selection function is asked about torch.device("cuda") directly.
"""

from __future__ import annotations

import logging

import pytest
import torch

from qlorakit import kernels
from qlorakit.errors import QlorakitError
from qlorakit.kernels import dispatch, ops
from qlorakit.kernels import reference as reference_impls

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The live registry, with every operation's table (and the said-once memory) replaced by a copy for the
    duration of the test, so that registering fake backends cannot leak into other tests."""
    for op in dispatch.OPERATIONS:
        monkeypatch.setitem(dispatch._registry, op, dict(dispatch._registry[op]))
    monkeypatch.setattr(dispatch, "_said", set())
    return dispatch._registry


def _fake_triton(op: str):
    def fake(*args, **kwargs):
        return ("fake triton", op)

    return fake


def test_every_operation_has_a_reference():
    assert set(dispatch.OPERATIONS) == {"dequantize_4bit", "linear_4bit", "linear_4bit_grad_input", "linear_4bit_cat",
                                        "linear_4bit_cat_grad_input", "quantize_4bit", "rms_norm", "rms_norm_backward",
                                        "swiglu", "swiglu_backward", "cross_entropy_grad", "qkv_rope",
                                        "qkv_rope_backward"}
    for op in dispatch.OPERATIONS:
        assert "reference" in dispatch._registry[op], op


@pytest.mark.parametrize("device", [CPU, CUDA], ids=["cpu", "cuda"])
def test_reference_is_used_when_requested(registry, monkeypatch, device):
    registry["linear_4bit"]["triton"] = _fake_triton("linear_4bit")
    monkeypatch.setenv("QLORAKIT_KERNELS", "reference")
    assert dispatch.implementation("linear_4bit", device) == ("reference", reference_impls.linear_4bit_ref)


def test_reference_computes_the_calls_on_cpu(monkeypatch):
    monkeypatch.setenv("QLORAKIT_KERNELS", "reference")
    w = torch.randn(8, 64)
    packed, state = kernels.call("quantize_4bit", w, 64, "nf4", True)
    x = torch.randn(3, 64)
    dense = kernels.call("dequantize_4bit", packed, state, torch.float32)
    assert torch.equal(kernels.call("linear_4bit", x, packed, state), x @ dense.T)
    grad_y = torch.randn(3, 8)
    assert torch.equal(kernels.call("linear_4bit_grad_input", grad_y, packed, state), grad_y @ dense)


def test_call_accepts_keyword_tensors_and_refuses_no_tensor(monkeypatch):
    monkeypatch.setenv("QLORAKIT_KERNELS", "reference")
    packed, state = kernels.call("quantize_4bit", x=torch.randn(4, 64), blocksize=64, quant_type="nf4",
                                 double_quant=False)
    assert packed.shape == (128, 1)
    with pytest.raises(QlorakitError, match="no tensor argument"):
        kernels.call("quantize_4bit", None, 64, "nf4", False)


def test_forced_triton_without_an_implementation_is_a_clear_error(registry, monkeypatch):
    monkeypatch.setenv("QLORAKIT_KERNELS", "triton")
    for op in dispatch.OPERATIONS:
        registry[op].pop("triton", None)
        with pytest.raises(QlorakitError, match=f"QLORAKIT_KERNELS=triton but {op} has no Triton implementation"):
            dispatch.implementation(op, CPU)


@pytest.mark.parametrize("value", ["cuda", "Triton2", "ref"])
def test_an_invalid_choice_names_the_allowed_values(monkeypatch, value):
    monkeypatch.setenv("QLORAKIT_KERNELS", value)
    with pytest.raises(QlorakitError, match=r"QLORAKIT_KERNELS=.* is not allowed; use one of auto, reference, triton"):
        dispatch.implementation("linear_4bit", CPU)


@pytest.mark.parametrize("value, expected", [("", "auto"), ("  Reference ", "reference"), ("TRITON", "triton")])
def test_the_choice_is_trimmed_and_case_insensitive(monkeypatch, value, expected):
    monkeypatch.setenv("QLORAKIT_KERNELS", value)
    assert dispatch.requested_backend() == expected


def test_unset_means_auto(monkeypatch):
    monkeypatch.delenv("QLORAKIT_KERNELS", raising=False)
    assert dispatch.requested_backend() == "auto"


def test_auto_picks_a_registered_triton_only_for_cuda_tensors(registry, monkeypatch):
    fake = kernels.register("dequantize_4bit", "triton", _fake_triton("dequantize_4bit"))
    registry["linear_4bit"].pop("triton", None)
    monkeypatch.setenv("QLORAKIT_KERNELS", "auto")

    assert dispatch.implementation("dequantize_4bit", CUDA) == ("triton", fake)
    assert dispatch.implementation("dequantize_4bit", CPU) == ("reference", reference_impls.dequantize_ref)
    # Only the operation that has one: the others stay on the reference even for CUDA.
    assert dispatch.implementation("linear_4bit", CUDA)[0] == "reference"


def test_forced_triton_picks_it_on_cpu_too(registry, monkeypatch):
    fake = _fake_triton("linear_4bit")
    registry["linear_4bit"]["triton"] = fake
    monkeypatch.setenv("QLORAKIT_KERNELS", "triton")

    assert dispatch.implementation("linear_4bit", CPU) == ("triton", fake)
    # eager kernels.call calls the registration directly; the custom op's body (the traced path) reaches it too
    packed, state = reference_impls.quantize_ref(torch.randn(8, 64), 64, "nf4", False)
    marker = torch.full((2, 8), 7.0)
    registry["linear_4bit"]["triton"] = lambda x, p, s, bias=None: marker.clone()
    assert torch.equal(kernels.call("linear_4bit", torch.zeros(2, 64), packed, state), marker)
    assert torch.equal(ops.linear_4bit(torch.zeros(2, 64), packed, state), marker)


def test_auto_on_cuda_without_triton_says_so_once_per_operation(registry, monkeypatch, caplog):
    monkeypatch.setenv("QLORAKIT_KERNELS", "auto")
    registry["linear_4bit"].pop("triton", None)
    registry["dequantize_4bit"].pop("triton", None)
    with caplog.at_level(logging.WARNING, logger="qlorakit.kernels"):
        for _ in range(3):
            assert dispatch.implementation("linear_4bit", CUDA)[0] == "reference"
        dispatch.implementation("dequantize_4bit", CUDA)
        dispatch.implementation("dequantize_4bit", CPU)  # CPU on the reference is expected, not news
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "qlorakit: linear_4bit runs on the PyTorch reference: no Triton implementation is available",
        "qlorakit: dequantize_4bit runs on the PyTorch reference: no Triton implementation is available",
    ]


def test_register_refuses_an_unknown_operation(registry):
    with pytest.raises(ValueError, match="unknown operation 'matmul_8bit'; known: dequantize_4bit"):
        kernels.register("matmul_8bit", "triton", _fake_triton("matmul_8bit"))


def test_register_works_as_a_decorator(registry):
    @kernels.register("quantize_4bit", "triton")
    def fake(*args):
        return "fake"

    assert registry["quantize_4bit"]["triton"] is fake


def test_the_registry_fixture_leaves_no_fake_behind():
    # Runs after the tests above (file order): none of their fake Triton implementations remain.
    for op in dispatch.OPERATIONS:
        impl = dispatch._registry[op].get("triton")
        assert impl is None or "fake" not in impl.__name__, op


def test_the_backend_is_chosen_once_and_the_environment_wins_for_debugging(monkeypatch):
    """set_backend (config model.kernels) picks the backend for the run; QLORAKIT_KERNELS, when set, wins."""
    from qlorakit.kernels import requested_backend, set_backend

    monkeypatch.delenv("QLORAKIT_KERNELS", raising=False)
    previous = set_backend("reference")
    try:
        assert requested_backend() == "reference"
        monkeypatch.setenv("QLORAKIT_KERNELS", "triton")
        assert requested_backend() == "triton"
        monkeypatch.delenv("QLORAKIT_KERNELS")
        assert set_backend("auto") == "reference" and requested_backend() == "auto"
        with pytest.raises(QlorakitError, match="kernels 'fast' is not allowed; use one of auto, reference, triton"):
            set_backend("fast")
    finally:
        set_backend(previous)

