"""`qlorakit inspect --calibration-tokens N`: each linear's output error on its real inputs, and `--plot`.

The output errors of the hooked forward equal a computation without hooks: the tiny model's forward written out
module by module (each linear's input taken where the decoder block computes it), the inputs sent through W and
through the reference's deq(q(W)) in fp64. The only difference is the module's fp32 arithmetic, bounded here from
first principles. The calibration tokens are the tokenizer's ids of the built-in text or of a data file's records;
too many tokens, a bad file or a plot path that is not a PNG are one line; the PNG is a real PNG."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_tokenizers import make_chatml_tokenizer

from cli_helpers import one_error_line
from qlorakit import cli
from qlorakit.data.calibration import BUILT_IN, calibration_tokens
from qlorakit.data.calibration_text import CALIBRATION_TEXT
from qlorakit.errors import DataFormatError, OptionValueError
from qlorakit.model.inspect_outputs import Calibration, calibration_output_errors, output_errors
from qlorakit.model.inspect_plot import block_ticks, plot_report
from qlorakit.model.inspect_weights import flag_outputs, inspect_model, layer_report
from qlorakit.model.loader import load_model
from qlorakit.quant import code_int4_symmetric, dequantize_blocks_4bit, quantize_blocks_4bit

BLOCKSIZE = 64
CONTEXT = 64
TOKENS = 48
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
U = 2.0 ** -24  # fp32 unit roundoff


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-block Llama (hidden 64, MLP 128, context 64) in bf16 safetensors, with the tiny ChatML tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = make_chatml_tokenizer()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=CONTEXT,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    folder = tmp_path_factory.mktemp("tiny-llama-tok")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # a few large input channels, as real activations have, for o_proj's inputs
            model.model.layers[1].self_attn.v_proj.weight[:, :4] *= 20
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 400, (1, TOKENS), generator=torch.Generator().manual_seed(4))


def linear_inputs(folder: Path, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every target linear's input [N, in_features] fp32, from the forward written out block by block (no hook):
    q/k/v read the input norm, o_proj the attention before its projection (o_proj set aside for the call), gate/up
    the post-attention norm of the residual, down_proj act(gate(x)) * up(x). The last hidden state must be the
    model's own, to the bit."""
    from transformers.masking_utils import create_causal_mask

    model, _ = load_model(folder, load_in_4bit=False, compute_dtype=torch.float32, device="cpu", progress=False)
    inner, out = model.model, {}
    with torch.inference_mode():
        h = inner.embed_tokens(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        mask = create_causal_mask(config=inner.config, inputs_embeds=h, attention_mask=None, cache=None,
                                  position_ids=pos)
        rope = inner.rotary_emb(h, position_ids=pos)
        for i, block in enumerate(inner.layers):
            name = f"model.layers.{i}."
            normed = block.input_layernorm(h)
            projection, block.self_attn.o_proj = block.self_attn.o_proj, torch.nn.Identity()
            try:
                attention, _ = block.self_attn(hidden_states=normed, attention_mask=mask, position_embeddings=rope,
                                               position_ids=pos)
            finally:
                block.self_attn.o_proj = projection
            residual = h + projection(attention)
            mlp_in = block.post_attention_layernorm(residual)
            down_in = block.mlp.act_fn(block.mlp.gate_proj(mlp_in)) * block.mlp.up_proj(mlp_in)
            h = residual + block.mlp.down_proj(down_in)
            for linear, x in zip(LINEARS, (normed, normed, normed, attention, mlp_in, mlp_in, down_in)):
                out[name + linear] = x.reshape(-1, x.shape[-1]).clone()
        assert torch.equal(inner.norm(h), inner(input_ids=ids, use_cache=False).last_hidden_state)
    return out


def stored_weight(folder: Path, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name + ".weight").to(torch.float32)


def reference_dequantized(w: torch.Tensor, kind: str) -> torch.Tensor:
    """deq(q(W)) fp32: the blockwise reference for nf4/fp4; INT4 written out (reciprocal-absmax scaling of each
    block, the nearest of the levels k/7 by fp32 midpoints, times absmax in fp32)."""
    if kind != "int4":
        packed, absmax = quantize_blocks_4bit(w, BLOCKSIZE, kind)
        return dequantize_blocks_4bit(packed, absmax, w.shape, BLOCKSIZE, kind, torch.float32)
    blocks = w.reshape(-1, BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = code_int4_symmetric()
    k = torch.bucketize((blocks * (1.0 / absmax)).clamp(-1, 1), (levels[:-1] + levels[1:]) / 2)
    return (levels[k] * absmax).reshape(w.shape)


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): |fl(sum of n products) - exact| <= gamma_n * sum of |products|."""
    return n * U / (1 - n * U)


def assert_within_fp32_bound(got: float, x: torch.Tensor, w: torch.Tensor, deq: torch.Tensor) -> None:
    """got is ||X (W - deq)^T|| / ||X W^T|| computed with fp32 products: W - deq rounds once (u), each of the
    [N, out] dot products of length K = in_features adds gamma_K, so the numerator is within gamma_{K+1} *
    || |X| |W - deq|^T || of the exact one and the denominator within gamma_K * || |X| |W|^T ||; fp64 norms add
    ~1e-16 relative. The exact ratio, moved by those amounts, must bracket got."""
    x, w, d = x.double(), w.double(), (w - deq).double()
    k = x.shape[1]
    num, den = (x @ d.t()).norm().item(), (x @ w.t()).norm().item()
    dnum = gamma(k + 1) * (x.abs() @ d.abs().t()).norm().item()
    dden = gamma(k) * (x.abs() @ w.abs().t()).norm().item()
    low, high = (num - dnum) / (den + dden), (num + dnum) / (den - dden)
    assert low * (1 - 1e-12) <= got <= high * (1 + 1e-12), (got, num / den, low, high)
    assert high - low < 1e-3 * num / den  # tight enough that a wrong input or code would fall outside


def test_output_errors_equal_the_direct_computation_without_hooks(model_dir, ids):
    inputs = linear_inputs(model_dir, ids)
    names = [f"model.layers.{i}.{linear}" for i in range(2) for linear in LINEARS]
    measured = calibration_output_errors(model_dir, names, ids, BLOCKSIZE, progress=False)
    assert list(measured) == names == list(inputs)
    for name in names:
        w = stored_weight(model_dir, name)
        for kind in ("nf4", "fp4", "int4"):
            assert_within_fp32_bound(measured[name][kind], inputs[name], w, reference_dequantized(w, kind))


def test_inspect_model_puts_them_on_the_layers_and_flags_them(model_dir, ids):
    report = inspect_model(model_dir, BLOCKSIZE, progress=False,
                           calibration=lambda: Calibration(ids, "random ids"))
    direct = calibration_output_errors(model_dir, [layer.name for layer in report.layers], ids, BLOCKSIZE,
                                       progress=False)
    assert {layer.name: layer.output_error for layer in report.layers} == direct
    assert report.calibration_tokens == TOKENS and report.calibration_source == "random ids"
    nf4 = torch.tensor([layer.output_error["nf4"] for layer in report.layers], dtype=torch.float64)
    mid = nf4.median()
    assert report.output_threshold == pytest.approx((mid + 3 * (nf4 - mid).abs().median()).item(), rel=1e-12)
    total = sum(layer.numel for layer in report.layers)
    assert report.mean_output_errors()["fp4"] == pytest.approx(
        sum(layer.numel * layer.output_error["fp4"] for layer in report.layers) / total)
    saved = json.loads(json.dumps(report.to_json()))
    assert saved["calibration"] == {"tokens": TOKENS, "source": "random ids"}
    assert saved["layers"][0]["output_error"] == report.layers[0].output_error


def test_one_call_on_fresh_random_inputs_and_the_zero_cases():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 7, 128, generator=g), torch.randn(96, 128, generator=g) * 0.02
    got = output_errors(x, w, BLOCKSIZE)
    for kind in ("nf4", "fp4", "int4"):
        assert_within_fp32_bound(got[kind], x.reshape(-1, 128), w, reference_dequantized(w, kind))
    assert output_errors(torch.zeros(5, 128), w, BLOCKSIZE) == {"nf4": 0.0, "fp4": 0.0, "int4": 0.0}
    assert output_errors(x, torch.zeros(96, 128), BLOCKSIZE) == {"nf4": 0.0, "fp4": 0.0, "int4": 0.0}


def test_output_flags_on_hand_made_errors():
    layers = [layer_report(f"l{i}", torch.zeros(1, 64)) for i in range(6)]
    for layer, e in zip(layers[:5], (0.10, 0.11, 0.12, 0.13, 0.20)):
        layer.output_error = {"nf4": e, "fp4": 0.15, "int4": 0.125}
    # layers[5] was never called: no output error, no flag; median 0.12, MAD 0.01 -> threshold 0.15
    assert flag_outputs(layers) == pytest.approx(0.15)
    assert [layer.output_outlier for layer in layers] == [False, False, False, False, True, False]
    assert [layer.output_beaten_by for layer in layers] == [[], [], [], ["int4"], ["fp4", "int4"], []]


def test_the_built_in_text_is_the_tokenizers_ids_and_too_many_tokens_is_one_line():
    tokenizer = make_chatml_tokenizer()
    expected = tokenizer(CALIBRATION_TEXT)["input_ids"] + [tokenizer.eos_token_id]
    got = calibration_tokens(tokenizer, 100)
    assert got.source == BUILT_IN and got.input_ids.dtype == torch.long
    assert got.input_ids.tolist() == [expected[:100]]
    with pytest.raises(DataFormatError, match=f"{len(expected)} tokens with this tokenizer, fewer than the"):
        calibration_tokens(tokenizer, len(expected) + 1)


def test_a_data_file_is_rendered_record_by_record_as_training_renders_it(tmp_path):
    from qlorakit.data.formats import record_pieces

    tokenizer = make_chatml_tokenizer()
    records = [{"instruction": f"Say it {i}.", "input": "", "output": "red green blue"} for i in range(20)]
    path = tmp_path / "seed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    stream = [t for r in records for ids, _ in record_pieces(
        tokenizer, r, fmt="alpaca", template="chat_template", train_on_inputs=True, max_seq_length=64,
        text_field="text", messages_field="messages") for t in ids]
    got = calibration_tokens(tokenizer, 60, str(path), "alpaca")
    assert got.input_ids.tolist() == [stream[:60]] and got.source == "seed.jsonl (alpaca)"
    with pytest.raises(DataFormatError, match="record 0 has no 'messages' field"):
        calibration_tokens(tokenizer, 60, str(path), "chat")


def test_block_ticks_name_each_block_once():
    names = [f"model.layers.{i}.{linear}" for i in range(3) for linear in LINEARS[:2]] + ["lm_extra"]
    assert block_ticks(names) == ([0, 2, 4], ["0", "1", "2"])


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the 8-byte signature and the chunk's CRC."""
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    length, = struct.unpack(">I", data[8:12])
    assert struct.unpack(">I", data[16 + length: 20 + length])[0] == zlib.crc32(data[12: 16 + length])
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def test_cli_calibrates_plots_and_writes_the_json(model_dir, tmp_path, capsys):
    plot, out = tmp_path / "layers.png", tmp_path / "inspect.json"
    assert cli.main(["inspect", str(model_dir), "--calibration-tokens", "40", "--plot", str(plot),
                     "--json-path", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "the 10 worst by NF4 output error" in text and "of the built-in English text" in text
    assert "parameter-weighted mean output error: nf4" in text and f"wrote {plot}" in text
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["calibration"] == {"tokens": 40, "source": BUILT_IN}
    assert all(set(layer["output_error"]) == {"nf4", "fp4", "int4"} for layer in saved["layers"])
    width, height = png_size(plot)
    assert width > 0 and height > 0 and plot.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inspect.json", "layers.png"]  # no temporary left


def test_plot_without_output_errors_and_a_path_that_is_not_png(model_dir, tmp_path):
    report = inspect_model(model_dir, BLOCKSIZE, progress=False)
    assert png_size(plot_report(report, tmp_path / "weights.PNG"))[0] > 0
    with pytest.raises(OptionValueError, match=r"^--plot .*weights\.jpg: the plot is a PNG image; give a path "
                                               r"ending in \.png$"):
        plot_report(report, tmp_path / "weights.jpg")


@pytest.mark.parametrize(("args", "words"), [
    (["--plot", "x.svg"], "--plot x.svg: the plot is a PNG image"),
    (["--calibration-tokens", "65"], f"reads at most {CONTEXT} positions at once"),
    (["--calibration-tokens", "-1"], "--calibration-tokens -1: allowed an integer >= 0 (0: off)"),
    (["--calibration-data", "missing.jsonl"], "missing.jsonl: data file not found"),
    (["--calibration-data", "x.jsonl", "--calibration-tokens", "0"], "x.jsonl with --calibration-tokens 0: no output"),
])
def test_bad_calibration_or_plot_options_are_one_line(model_dir, args, words, capsys):
    assert cli.main(["inspect", str(model_dir), "--no-progress", *args]) == 2
    assert words in one_error_line(capsys)


def test_a_folder_without_a_tokenizer_says_so_and_zero_tokens_needs_none(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=32, max_position_embeddings=CONTEXT)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, safe_serialization=True)
    assert cli.main(["inspect", str(tmp_path), "--no-progress"]) == 2
    assert "cannot load its tokenizer" in one_error_line(capsys)
    assert cli.main(["inspect", str(tmp_path), "--no-progress", "--calibration-tokens", "0"]) == 0
    text = capsys.readouterr().out
    assert "parameter-weighted mean error over" in text and "output" not in text
