"""`qlorakit inspect`: per quantizable linear weight, its statistics and the NF4 / FP4 / INT4 reconstruction error.

The errors are the blockwise reference's own (recomputed here from quantize/dequantize calls), the moments are the
textbook ones (checked against the known kurtosis of normal and Laplace samples), a heavy-tailed layer among
normal ones is flagged and a uniform one is reported as better served by INT4, and a folder that is not a model
is one line naming it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cli_helpers import one_error_line
from qlorakit import cli
from qlorakit.errors import CheckpointFormatError
from qlorakit.model.inspect_weights import (flag_layers, inspect_model, layer_report, normal_distance,
                                            normal_quantiles)
from qlorakit.quant import code_int4_symmetric, dequantize_blocks_4bit, quantize_blocks_4bit

BLOCKSIZE = 64
HEAVY = "model.layers.1.mlp.down_proj"  # Student-t with 2 degrees of freedom: infinite variance, huge kurtosis
UNIFORM = "model.layers.0.self_attn.k_proj"  # uniform on [-1, 1]: evenly spaced INT4 levels fit it best
TARGETS = [f"model.layers.{i}.{m}" for i in range(2) for m in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")]


def tiny_llama_config(layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32, max_position_embeddings=64, tie_word_embeddings=False)


def save_llama(folder: Path, layers: int = 2) -> Path:
    """A tiny Llama in bf16 safetensors: N(0, 0.02^2) linear weights, except HEAVY (t, 2 dof) and UNIFORM."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_llama_config(layers), dtype=torch.float32)
        modules = dict(model.named_modules())
        for name in TARGETS[: 7 * layers]:
            weight = modules[name].weight
            if name == HEAVY:
                sample = torch.distributions.StudentT(2.0).sample(weight.shape) * 0.02
            elif name == UNIFORM:
                sample = torch.rand(weight.shape) * 0.04 - 0.02
            else:
                sample = torch.randn(weight.shape) * 0.02
            weight.data.copy_(sample)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def report(llama_dir):
    return inspect_model(llama_dir, BLOCKSIZE, progress=False)


def stored_weight(folder: Path, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name + ".weight").to(torch.float32)


def reference_errors(w: torch.Tensor) -> dict[str, float]:
    """||W - deq(q(W))|| / ||W|| per type, from the reference calls; INT4 written out here: reciprocal-absmax
    scaling of each block (n is a multiple of 64), the nearest of the levels k/7 by fp32 midpoints (ties to the
    lower level), times absmax in fp32."""
    def rel(restored: torch.Tensor) -> float:
        return (torch.linalg.vector_norm(w - restored, dtype=torch.float64)
                / torch.linalg.vector_norm(w, dtype=torch.float64)).item()

    out = {}
    for kind in ("nf4", "fp4"):
        packed, absmax = quantize_blocks_4bit(w, BLOCKSIZE, kind)
        out[kind] = rel(dequantize_blocks_4bit(packed, absmax, w.shape, BLOCKSIZE, kind, torch.float32))
    blocks = w.reshape(-1, BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = (blocks * (1.0 / absmax)).clamp(-1, 1)
    levels = code_int4_symmetric()
    k = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2)
    out["int4"] = rel((levels[k] * absmax).reshape(w.shape))
    return out


def test_every_target_linear_is_reported_in_order_with_its_shape(report):
    assert [layer.name for layer in report.layers] == TARGETS
    for layer in report.layers:
        assert layer.numel == math.prod(layer.shape)
    assert {layer.name: layer.shape for layer in report.layers}[HEAVY] == [64, 128]


def test_errors_are_the_reference_quantizers_to_the_bit(llama_dir, report):
    for layer in report.layers:
        assert layer.error == reference_errors(stored_weight(llama_dir, layer.name)), layer.name


def test_std_and_normal_distance_of_a_stored_layer(llama_dir, report):
    layer = report.layers[0]
    w = stored_weight(llama_dir, layer.name).double().reshape(-1)
    assert layer.std == pytest.approx(math.sqrt(((w - w.mean()) ** 2).mean().item()), rel=1e-12)
    blocks = w.reshape(-1, BLOCKSIZE)
    ordered = (blocks / blocks.abs().amax(dim=1, keepdim=True)).sort(dim=1).values
    # fp32 reciprocal scaling in the module against an fp64 division here: within a few fp32 ulps of 1
    assert layer.normal_distance == pytest.approx((ordered - normal_quantiles(BLOCKSIZE)).abs().mean().item(),
                                                  abs=1e-6)


def test_normal_quantiles_are_symmetric_and_end_at_one():
    z = normal_quantiles(BLOCKSIZE)
    assert z[0].item() == -1.0 and z[-1].item() == 1.0
    assert torch.allclose(z, -z.flip(0), atol=1e-15, rtol=0)


# Sample excess kurtosis has standard error sqrt(V / n); V = beta8 - beta4^2 - 4 beta4 beta6 + 4 beta4^3 for a
# symmetric law (beta_k = mu_k / sigma^k): 105 - 9 - 180 + 108 = 24 for a normal, 2520 - 36 - 2160 + 864 = 1188
# for a Laplace (beta4 = 6, beta6 = 90, beta8 = 2520). Tolerance: 5 standard errors.
N_KURT = 512 * 512


@pytest.mark.parametrize(("law", "expected", "v"), [("normal", 0.0, 24.0), ("laplace", 3.0, 1188.0)])
def test_excess_kurtosis_of_normal_and_laplace_weights(law, expected, v):
    g = torch.Generator().manual_seed(1)
    if law == "normal":
        w = torch.randn(512, 512, generator=g) * 0.02
    else:  # inverse CDF of Laplace(0, b) on uniform (-1/2, 1/2)
        u = torch.rand(512, 512, generator=g, dtype=torch.float64) - 0.5
        w = (-0.02 * torch.sign(u) * torch.log1p(-2 * u.abs())).float()
    layer = layer_report(law, w, BLOCKSIZE)
    assert layer.excess_kurtosis == pytest.approx(expected, abs=5 * math.sqrt(v / N_KURT))


def test_normal_distance_grows_with_the_tails():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        normal = torch.randn(256, 256)
        heavy = torch.distributions.StudentT(torch.tensor(2.0)).sample((256, 256))
    assert normal_distance(normal, BLOCKSIZE) < normal_distance(heavy, BLOCKSIZE)
    assert normal_distance(torch.randn(10), BLOCKSIZE) is None  # no full block


def test_the_heavy_tailed_layer_is_the_nf4_outlier_and_int4_wins_on_the_uniform_one(report):
    nf4 = torch.tensor([layer.error["nf4"] for layer in report.layers], dtype=torch.float64)
    mid = nf4.median()
    assert report.nf4_threshold == pytest.approx((mid + 3 * (nf4 - mid).abs().median()).item(), rel=1e-12)
    assert [layer.name for layer in report.layers if layer.nf4_outlier] == [HEAVY]
    beaten = {layer.name: layer.beaten_by for layer in report.layers if layer.beaten_by}
    assert beaten == {UNIFORM: ["int4"]}
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name[HEAVY].excess_kurtosis > 10 > by_name[TARGETS[0]].excess_kurtosis


def test_flagging_rule_on_hand_made_errors():
    layers = [layer_report(f"l{i}", torch.zeros(1, 64)) for i in range(5)]  # all-zero weights: error 0
    for layer, e in zip(layers, (0.10, 0.11, 0.12, 0.13, 0.20)):
        layer.error = {"nf4": e, "fp4": 0.15, "int4": 0.125}
    # median 0.12, |e - median| = .02 .01 0 .01 .08 -> MAD 0.01, threshold 0.15
    assert flag_layers(layers) == pytest.approx(0.15)
    assert [layer.nf4_outlier for layer in layers] == [False, False, False, False, True]
    assert [layer.beaten_by for layer in layers] == [[], [], [], ["int4"], ["fp4", "int4"]]


def test_totals_are_parameter_weighted(report):
    total = sum(layer.numel for layer in report.layers)
    for kind, mean in report.mean_errors().items():
        assert mean == pytest.approx(sum(layer.numel * layer.error[kind] for layer in report.layers) / total)
    assert report.best_type() == "nf4"


def test_cli_prints_the_table_and_writes_the_json(llama_dir, report, tmp_path, capsys):
    out = tmp_path / "inspect.json"
    # this folder has no tokenizer: no calibration tokens (output errors: test_inspect_outputs.py)
    assert cli.main(["inspect", str(llama_dir), "--json-path", str(out), "--no-progress",
                     "--calibration-tokens", "0"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 10
    assert rows[0].startswith(HEAVY) and "NF4 OUTLIER" in rows[0]
    assert "best overall: nf4" in text
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(report.to_json()))
    assert saved["nf4_outliers"] == [HEAVY] and saved["nf4_beaten"] == [UNIFORM]
    assert len(saved["layers"]) == 14 and saved["blocksize"] == BLOCKSIZE


def bad_folders(root: Path) -> dict[str, Path]:
    missing = root / "missing"
    no_config = root / "no-config"
    no_config.mkdir()
    no_weights = root / "no-weights"
    no_weights.mkdir()
    tiny_llama_config().save_pretrained(no_weights)
    no_linears = save_llama(root / "no-linears", layers=0)  # embeddings, norm and head only
    return {"no such folder": missing, "no config.json": no_config, "no model.safetensors": no_weights,
            "no linear layers to quantize": no_linears}


def test_bad_folders_are_one_line_naming_the_path(tmp_path, capsys):
    for words, folder in bad_folders(tmp_path).items():
        with pytest.raises(CheckpointFormatError, match=words):
            inspect_model(folder, progress=False)
        assert cli.main(["inspect", str(folder), "--no-progress"]) == 2
        line = one_error_line(capsys)
        assert str(folder) in line and words in line
