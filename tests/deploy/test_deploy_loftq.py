"""lora.init loftq on the deploy tests' tiny Llama (bf16 weights, 14 linears of 64x64 .. 128x64), rank 8, alpha 16:

- the init: W - (deq + s B0 A0) is, layer by layer, the rank-8 truncation residual of R = W - deq, as the float64
  SVD predicts (to the fp32 SVD's backward error), smaller than W - deq, and the layer outputs on random inputs
  are closer to the 16-bit ones;
- `merge` of a loftq adapter gives deq + s B A, the model that was trained, within one bf16 rounding (not W + s B A);
- the rank-2r export for the 16-bit base, loaded by PEFT itself, is W + s B A - s B0 A0, which differs from the
  trained model by the truncation residual R - R_r (measured: ||R - R_r|| / ||R|| = 0.81 over the 14 layers);
- inference refuses a loftq adapter on the 16-bit weights and its export on the 4-bit base.

Tolerances come from the arithmetic: fp32's unit roundoff 2^-24 and bf16's 2^-8 times the magnitudes summed.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlorakit.adapters.fingerprint import base_fingerprint
from qlorakit.adapters.loftq import export_for_16bit_base
from qlorakit.adapters.merge import merge_adapter
from qlorakit.adapters.peft_format import INIT_NAME, PEFT_PREFIX, save_adapter
from qlorakit.errors import AdapterMismatchError, QlorakitError
from qlorakit.model.loader import load_model
from qlorakit.model.loftq_init import loftq_initialize
from qlorakit.model.lora_inject import inject_lora
from qlorakit.nn.lora import LoraLinear

R, ALPHA = 8, 16.0
S = ALPHA / R
U32, U_BF16 = 2.0 ** -24, 2.0 ** -8  # unit roundoffs (round to nearest) of fp32 and bf16
QUANTIZATION = {"load_in_4bit": True, "quant_type": "nf4", "compute_dtype": "float32", "double_quant": True,
                "blocksize": 64}


def _loftq_model(base):
    model, _ = load_model(base, compute_dtype=torch.float32, progress=False)
    names = inject_lora(model, "all-linear", r=R, alpha=ALPHA, dropout=0.0)
    return model, names, loftq_initialize(model, base, names, progress=False)


def _stored(base) -> dict[str, torch.Tensor]:
    return load_file(base / "model.safetensors")


def _svd_bound(residual: torch.Tensor) -> float:
    """What the fp32 SVD may miss the optimum by, in the Frobenius norm: it is the exact SVD of R + E with
    ||E|| <= min(m, n) * u32 * ||R|| (backward stable, with a generous polynomial), so ||R - X|| exceeds
    ||R - R_r|| by at most 2 ||E||; the fp32 factors and their product add a few u32 * ||R|| more."""
    return (2 * min(residual.shape) + 8) * U32 * float(residual.norm())


def random_training_step(model, seed: int = 3) -> None:
    """What training would do to the adapters, as a random step on every LoRA A and B."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_A.weight.add_(0.05 * torch.randn(m.lora_A.weight.shape, generator=gen))
                m.lora_B.weight.add_(0.02 * torch.randn(m.lora_B.weight.shape, generator=gen))


@pytest.fixture(scope="module")
def initialised(tiny_base):
    return _loftq_model(tiny_base)


@pytest.fixture(scope="module")
def trained_adapter(tiny_base, tmp_path_factory):
    """A loftq adapter 'after training': the init plus a random step on A and B, saved with the record a
    training run writes (lora_init loftq, the quantization) and the starting weights beside it."""
    model, _, _ = _loftq_model(tiny_base)
    random_training_step(model)
    record = {"base_fingerprint": base_fingerprint(tiny_base), "base_model": str(tiny_base), "lora_init": "loftq",
              "quantization": QUANTIZATION}
    folder = save_adapter(model, tmp_path_factory.mktemp("loftq") / "adapter", qlorakit_record=record)
    return folder, model


def _adapter(folder, name: str, file: str = "adapter_model.safetensors") -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(folder / file)
    return (t[f"{PEFT_PREFIX}{name}.lora_A.weight"].double(), t[f"{PEFT_PREFIX}{name}.lora_B.weight"].double())


def test_init_leaves_exactly_the_truncation_residual_of_the_quantization_error(tiny_base, initialised):
    model, names, report = initialised
    stored = _stored(tiny_base)
    assert len(names) == 14 and sorted(report.residual_sq) == sorted(names) and report.default_init == []
    for name in names:
        layer = model.get_submodule(name)
        w = stored[name + ".weight"].double()
        deq = layer.base_layer.dequantize(torch.float32).double()
        residual = w - deq
        sigma = torch.linalg.svdvals(residual)
        predicted = float(sigma[R:].square().sum().sqrt())
        a, b = layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double()
        left = float((residual - S * b @ a).norm())
        assert left < float(residual.norm())
        assert abs(left - predicted) <= _svd_bound(residual), name
        # the relative reduction the report states is the SVD's prediction
        assert report.dropped_sq[name] / report.residual_sq[name] == pytest.approx(
            predicted ** 2 / float(sigma.square().sum()), rel=4 * _svd_bound(residual) / predicted)
        assert torch.equal(layer.initial_weights[0], layer.lora_A.weight)
        assert torch.equal(layer.initial_weights[1], layer.lora_B.weight)


def test_init_brings_every_layer_output_closer_to_the_16bit_one(tiny_base, initialised):
    model, names, _ = initialised
    stored = _stored(tiny_base)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    ratios = []
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            xi = x[:, : layer.in_features].contiguous()
            exact = xi.double() @ stored[name + ".weight"].double().T
            err_4bit = float((layer.base_layer(xi).double() - exact).norm())
            err_loftq = float((layer(xi).double() - exact).norm())
            assert err_loftq < err_4bit, name
            ratios.append(err_loftq / err_4bit)
    assert max(ratios) < 0.9  # rank 8 of 64 removes at least a fifth of each layer's output error here


def test_merge_of_a_loftq_adapter_is_the_trained_model_within_one_bf16_rounding(tiny_base, trained_adapter,
                                                                                  tmp_path):
    folder, model = trained_adapter
    out = merge_adapter(tiny_base, folder, tmp_path / "merged", progress=False).out_dir
    merged, stored = _stored(out), _stored(tiny_base)
    adapted = 0
    for name, w in stored.items():
        module = name.removesuffix(".weight")
        if not isinstance(model.get_submodule(module) if name.endswith(".weight") else None, LoraLinear):
            assert torch.equal(merged[name], w), name
            continue
        a, b = _adapter(folder, module)
        deq = model.get_submodule(module).base_layer.dequantize(torch.float32).double()
        trained = deq + S * b @ a
        # fp32: the rank-R products, the scaling and the sum round; then one rounding to bf16
        fp32_err = (R + 2) * U32 * (S * b.abs() @ a.abs() + trained.abs())
        bound = U_BF16 * (trained.abs() + fp32_err) + fp32_err
        assert merged[name].dtype == torch.bfloat16
        assert bool(((merged[name].double() - trained).abs() <= bound).all()), name
        # merging into W instead would miss by the quantization error, far beyond that bound
        assert float((w.double() + S * b @ a - trained).abs().max()) > 10 * float(bound.max())
        adapted += 1
    assert adapted == 14


def test_export_for_the_16bit_base_loaded_by_peft_is_w_plus_update_minus_init(tiny_base, trained_adapter,
                                                                              tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, model = trained_adapter
    out = export_for_16bit_base(folder, tmp_path / "adapter-16bit")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (2 * R, 2 * ALPHA, True)
    assert not (out / INIT_NAME).exists()
    assert json.loads((out / "qlorakit_adapter.json").read_text())["converted_for_16bit_base"] is True
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                                           str(out))
    merged = {k + ".weight": v.weight.detach().double() for k, v in peft_model.merge_and_unload().named_modules()
              if isinstance(v, torch.nn.Linear)}
    stored = _stored(tiny_base)
    gaps, residuals = [], []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLinear):
            continue
        (a, b), (a0, b0) = _adapter(folder, name), _adapter(folder, name, INIT_NAME)
        w = stored[name + ".weight"].double()
        want = w + S * (b @ a - b0 @ a0)
        # PEFT in fp32: W + (B' @ A') * s', B' A' a sum of 2R products
        bound = (2 * R + 2) * U32 * (S * (b.abs() @ a.abs() + b0.abs() @ a0.abs()) + want.abs())
        assert bool(((merged[name + ".weight"] - want).abs() <= bound).all()), name
        # against the trained model deq + s B A, the export misses by R - R_r: the truncation residual
        deq = layer.base_layer.dequantize(torch.float32).double()
        residual = w - deq
        gap = float((want - (deq + S * b @ a)).norm())
        predicted = float(torch.linalg.svdvals(residual)[R:].square().sum().sqrt())
        assert abs(gap - predicted) <= _svd_bound(residual), name
        gaps.append(gap ** 2)
        residuals.append(float(residual.norm()) ** 2)
    assert len(gaps) == 14
    assert (sum(gaps) / sum(residuals)) ** 0.5 == pytest.approx(0.81, abs=0.01)  # the docstring's number


def test_merge_of_the_export_adds_its_update_to_w_as_for_any_adapter(tiny_base, trained_adapter, tmp_path):
    folder, _ = trained_adapter
    exported = export_for_16bit_base(folder, tmp_path / "adapter-16bit")
    merged = _stored(merge_adapter(tiny_base, exported, tmp_path / "merged", progress=False).out_dir)
    for name, w in _stored(tiny_base).items():
        key = f"{PEFT_PREFIX}{name.removesuffix('.weight')}"
        if name.endswith("_proj.weight"):
            a, b = _adapter(exported, name.removesuffix(".weight"))
            assert torch.equal(merged[name], (w.float() + S * (b.float() @ a.float())).to(w.dtype)), key


def test_peft_loads_the_loftq_adapter_itself_as_plain_lora(tiny_base, trained_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, _ = trained_adapter
    assert json.loads((folder / "adapter_config.json").read_text())["init_lora_weights"] is True
    assert json.loads((folder / "qlorakit_adapter.json").read_text())["lora_init"] == "loftq"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                                       str(folder))
    a, _ = _adapter(folder, "model.layers.0.self_attn.q_proj")
    got = loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(got.double(), a)


def test_inference_refuses_a_loftq_adapter_on_the_wrong_kind_of_base(tiny_base, trained_adapter, tmp_path):
    from qlorakit.infer.session import load_for_inference

    folder, _ = trained_adapter
    with pytest.raises(AdapterMismatchError, match="fitted to the 4-bit base") as err:
        load_for_inference(str(tiny_base), str(folder), device="cpu", quantize=False, progress=False)
    assert "\n" not in str(err.value)
    exported = export_for_16bit_base(folder, tmp_path / "adapter-16bit")
    with pytest.raises(AdapterMismatchError, match="16-bit-base export"):
        load_for_inference(str(tiny_base), str(exported), device="cpu", quantize=True, progress=False)


def test_export_refuses_an_adapter_that_is_not_loftq(adapter, tmp_path):
    with pytest.raises(QlorakitError, match="not a lora.init loftq adapter"):
        export_for_16bit_base(adapter, tmp_path / "out")


def test_a_targeted_linear_that_is_not_4bit_keeps_the_default_init_said_once(tiny_base, caplog):
    model, _ = load_model(tiny_base, compute_dtype=torch.float32, progress=False)
    mlp = model.model.layers[0].mlp
    dense = torch.nn.Linear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
    dense.weight.data = mlp.down_proj.dequantize(torch.float32)
    mlp.down_proj = dense
    names = inject_lora(model, "all-linear", r=R, alpha=ALPHA, dropout=0.0)
    with caplog.at_level("INFO", logger="qlorakit.model"):
        report = loftq_initialize(model, tiny_base, names, progress=False)
    assert report.default_init == ["model.layers.0.mlp.down_proj"] and len(report.residual_sq) == 13
    said = [r.getMessage() for r in caplog.records if "not 4-bit" in r.getMessage()]
    assert len(said) == 1 and "model.layers.0.mlp.down_proj" in said[0]
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert not layer.lora_B.weight.any() and torch.equal(layer.initial_weights[0], layer.lora_A.weight)


def test_a_rank_above_the_matrix_rank_pads_with_zeros_and_leaves_nothing():
    from qlorakit.model.loftq_init import residual_factors

    gen = torch.Generator().manual_seed(0)
    w, deq = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    a, b, total, dropped = residual_factors(w, deq, 6, 0.5)
    assert a.shape == (6, 4) and b.shape == (8, 6) and dropped == 0.0
    assert not a[4:].any() and not b[:, 4:].any()
    residual = (w - deq).double()
    assert total == pytest.approx(float(residual.square().sum()), rel=16 * U32)
    torch.testing.assert_close(0.5 * b.double() @ a.double(), residual, rtol=0, atol=16 * U32 * float(residual.norm()))
