"""`qlorakit estimate`: the memory estimator's static components equal, to the byte, the tensors qlorakit allocates
when it loads a tiny model in 4 bits, puts LoRA on it and takes an optimizer step; the Llama-3-8B and Llama-2-70B
shapes estimate from a config.json alone against hand-computed sizes; the CLI prints the table, JSON and budget
advice; mistakes are one line."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from pipeline_helpers import save_tiny_model, write_yaml

from cli_helpers import one_error_line
from qlorakit import cli
from qlorakit.config import config_from_dict
from qlorakit.memory import estimate, suggest
from qlorakit.memory.estimate import ALLOCATOR_MARGIN, CUDA_CONTEXT_BYTES, LOSS_CHUNK_ROWS
from qlorakit.model.loader import load_model
from qlorakit.model.lora_inject import inject_lora
from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.nn.lora import LoraLinear
from qlorakit.optim import OPTIMIZERS, build_optimizer


@pytest.fixture(autouse=True)
def _no_host_memory_to_pin(monkeypatch):
    """These plans are made with no host memory to keep activations in (training.host_activations_gib stays 0),
    so they do not depend on the machine; test_estimate_hosted.py plans with it."""
    monkeypatch.setattr(importlib.import_module("qlorakit.memory.plan"), "host_available_bytes", lambda: 0)


def _cfg(model_dir, **sections) -> object:
    tree = {"model": {"name": str(model_dir)}, "lora": {"rank": 64},
            "training": {"batch_size": 2, "max_seq_length": 64, "gradient_accumulation": 1}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return config_from_dict(tree)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _allocated(model) -> dict[str, int]:
    """Bytes of what a loaded, LoRA-injected model holds, split as the estimator splits it."""
    four_bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    lora = {id(p) for m in model.modules() if isinstance(m, LoraLinear) for p in (m.lora_A.weight, m.lora_B.weight)}
    in_4bit = {id(b) for m in four_bit for b in m.buffers()} | {id(p) for m in four_bit for p in m.parameters()}
    return {
        "weights_4bit": sum(_nbytes(m.weight) for m in four_bit),
        "quant_constants": sum(_nbytes(m.absmax) + _nbytes(m.quant_map) + _nbytes(m.nested_absmax)
                               + _nbytes(m.nested_quant_map) + _nbytes(m.nested_offset) for m in four_bit),
        "embeddings_head_norms": sum(_nbytes(p) for p in model.parameters() if id(p) not in lora | in_4bit)
        + sum(_nbytes(b) for b in model.buffers() if id(b) not in in_4bit)
        + sum(_nbytes(m.bias) for m in four_bit),
        "lora_adapters": sum(_nbytes(p) for p in model.parameters() if id(p) in lora),
    }


def _load(model_dir, cfg):
    q = cfg.quantization
    model, _ = load_model(model_dir, load_in_4bit=True, quant_type=q.quant_type, blocksize=q.blocksize,
                          double_quant=q.double_quant, compute_dtype=torch.bfloat16, device="cpu", progress=False)
    inject_lora(model, cfg.lora.target_modules, r=cfg.lora.rank, alpha=16, dropout=0.0)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_static_components_equal_what_loading_allocates(tmp_path_factory, tiny_model_dir, arch, blocksize,
                                                        double_quant):
    model_dir = tiny_model_dir if arch == "llama" else save_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")
    cfg = _cfg(model_dir, quantization={"blocksize": blocksize, "double_quant": double_quant})
    est = estimate(cfg, model_dir)
    held = _allocated(_load(model_dir, cfg))
    for key, nbytes in held.items():
        assert est.component(key) == nbytes, key
    assert est.component("lora_gradients") == held["lora_adapters"]


@pytest.mark.parametrize("optimizer", sorted(set(OPTIMIZERS) - {"host_adamw_32bit"}))
def test_optimizer_states_equal_the_arenas_after_one_step(tiny_model_dir, optimizer):
    """The CPU keeps every state in one host arena; the estimator splits the same slots by their CUDA placement,
    so the sum over placements is the arena's size. 8-bit runs quantize the tensors of >= 4096 elements (r=64
    makes lora_A of the tiny model's 64-wide linears 4096) and keep the others in fp32."""
    cfg = _cfg(tiny_model_dir, training={"optimizer": optimizer})
    model = _load(tiny_model_dir, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, params, lr=1e-3, weight_decay=0.0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    arenas = sum(a.nbytes for a in opt.arenas)
    est = estimate(cfg, tiny_model_dir)
    states = sum(est.component(k) for k in ("optimizer_states", "optimizer_states_paged"))
    states += sum(c.nbytes for c in est.host if c.key == "optimizer_states_pinned")
    assert states == arenas
    quantized = [s.quantized for a in opt.arenas for s in a.slots]
    assert any(quantized) == optimizer.endswith("8bit") and all(quantized) is False


def test_host_optimizer_and_host_embeddings_equal_what_the_model_then_holds(tiny_model_dir):
    """host_adamw_32bit turns the adapters into the compute dtype and keeps 12 B per element in host memory;
    embeddings_on_host takes the input table and the LM head off the device (the head comes back for each loss):
    the estimate's components equal those bytes."""
    from qlorakit.model.host_embedding import host_embedding_bytes, move_embeddings_to_host, move_head_to_host

    plain_cfg = _cfg(tiny_model_dir)
    cfg = _cfg(tiny_model_dir, training={"optimizer": "host_adamw_32bit", "max_grad_norm": None,
                                         "embeddings_on_host": True, "head_on_host": True,
                                         "gradient_accumulation": 2})
    model = _load(tiny_model_dir, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer("host_adamw_32bit", params, lr=1e-3, weight_decay=0.0, compute_dtype=torch.bfloat16,
                          accumulation=2)
    assert move_embeddings_to_host(model, allow_cpu=True) is None
    assert move_head_to_host(model, allow_cpu=True) is None
    est, plain = estimate(cfg, tiny_model_dir), estimate(plain_cfg, tiny_model_dir)
    held = _allocated(model)
    assert est.component("lora_adapters") == held["lora_adapters"] == plain.component("lora_adapters") // 2
    assert est.component("embeddings_head_norms") == held["embeddings_head_norms"]
    moved = host_embedding_bytes(model)
    assert moved > 0 and plain.component("embeddings_head_norms") - est.component("embeddings_head_norms") == moved
    host = {c.key: c.nbytes for c in est.host}
    assert host["input_embeddings"] + host["lm_head"] == moved
    assert host["optimizer_states_pinned"] == opt.state_bytes_total()  # master + 2 moments + accumulation sum
    assert est.component("optimizer_states_paged") == est.component("optimizer_states") == 0
    # in flight: two layers' gradients in the compute dtype, of 2 layers here
    assert est.component("lora_gradients") == est.component("lora_adapters")


def test_paged_and_offloaded_states_leave_the_gpu(tiny_model_dir):
    paged = estimate(_cfg(tiny_model_dir, training={"optimizer": "paged_adamw_32bit"}), tiny_model_dir)
    offload = estimate(_cfg(tiny_model_dir, training={"optimizer": "offload_adamw_32bit"}), tiny_model_dir)
    assert paged.component("optimizer_states_paged") > 0
    assert paged.device_peak - paged.component("optimizer_states_paged") == int(
        paged.torch_peak * (1 + ALLOCATOR_MARGIN)) + CUDA_CONTEXT_BYTES
    assert any(c.key == "optimizer_states_paged" for c in paged.host)
    pinned = next(c.nbytes for c in offload.host if c.key == "optimizer_states_pinned")
    assert pinned > 0 and offload.component("offload_staging") > 0
    assert offload.component("optimizer_states_paged") == 0


def _write_config(folder, **fields):
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**fields).save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))  # config.json alone
    return folder


LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False)
LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)


def test_llama3_8b_from_config_json_alone(tmp_path):
    model_dir = _write_config(tmp_path / "llama3-8b", **LLAMA3_8B)
    est = estimate(_cfg(model_dir, training={"batch_size": 1, "max_seq_length": 2048}), model_dir)
    # Per layer q, o 4096x4096; k, v 1024x4096; gate, up, down 14336x4096: 218,103,808 weights; x 32 layers.
    weights = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    assert weights == 6_979_321_856
    assert est.component("weights_4bit") == 3_489_660_928  # half a byte each
    # Double quantization at 64: a uint8 per 64 weights, an fp32 per 256 of those per linear (q: 1024 of them,
    # k/v: 256, MLP: 3584), and per linear the 16-entry + 256-entry fp32 codebooks and the fp32 offset.
    nested = 32 * 4 * (2 * 1024 + 2 * 256 + 3 * 3584)
    assert est.component("quant_constants") == weights // 64 + nested + 224 * (64 + 1024 + 4) == 111_000_448
    # Untied embeddings and head 128256 x 4096 in bf16, 65 RMSNorm weights [4096]; the rest is RoPE's fp32 tables.
    dense = 2 * 128256 * 4096 * 2 + 65 * 4096 * 2
    assert 0 <= est.component("embeddings_head_norms") - dense <= 1024
    # r=64 on all 224 linears: 64 x (in + out) = 167,772,160 parameters, fp32.
    assert est.component("lora_adapters") == 167_772_160 * 4
    assert est.component("optimizer_states_paged") == 167_772_160 * 8  # two fp32 moments, paged
    assert est.component("dequant_workspace") == 2 * 14336 * 4096 * 2  # the stacked gate/up weight in bf16
    assert est.component("saved_activations") == 32 * 2048 * 4096 * 2  # one layer input per recomputed layer
    assert "8.03B parameters" in est.summary
    no_dq = estimate(_cfg(model_dir, quantization={"double_quant": False}), model_dir)
    assert no_dq.component("quant_constants") == weights // 64 * 4 + 224 * 64


def test_llama2_70b_from_config_json_alone(tmp_path):
    model_dir = _write_config(tmp_path / "llama2-70b", **LLAMA2_70B)
    est = estimate(_cfg(model_dir, training={"batch_size": 1, "max_seq_length": 2048}), model_dir)
    # Per layer q, o 8192x8192; k, v 1024x8192; gate, up, down 28672x8192: 855,638,016 weights; x 80 layers.
    weights = 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192)
    assert weights == 68_451_041_280
    assert est.component("weights_4bit") == 34_225_520_640
    nested = 80 * 4 * (2 * 4096 + 2 * 512 + 3 * 14336)
    assert est.component("quant_constants") == weights // 64 + nested + 560 * (64 + 1024 + 4) == 1_086_870_720
    dense = 2 * 32000 * 8192 * 2 + 161 * 8192 * 2
    assert 0 <= est.component("embeddings_head_norms") - dense <= 1024
    assert est.component("lora_adapters") == 80 * 64 * (2 * 16384 + 2 * 9216 + 3 * 36864) * 4
    assert "68.98B parameters" in est.summary
    full = next(m for m in est.comparisons if m.name == "full_16bit")
    params = 68_976_648_192
    assert 0 <= full.weights - params * 2 <= 1024 and full.grads_and_states == params * 2 + params * 8
    lora16 = next(m for m in est.comparisons if m.name == "lora_16bit")
    assert lora16.weights == weights * 2 + est.component("embeddings_head_norms") + est.component("lora_adapters")


def test_unstacked_dequantize_workspace_is_the_largest_single_weight(tmp_path):
    model_dir = _write_config(tmp_path / "llama2-70b", **LLAMA2_70B)
    stacked = estimate(_cfg(model_dir), model_dir)
    single = estimate(_cfg(model_dir, training={"stacked_dequant": False}), model_dir)
    assert stacked.component("dequant_workspace") == 2 * 28672 * 8192 * 2  # gate/up stacked, bf16
    assert single.component("dequant_workspace") == 28672 * 8192 * 2
    assert stacked.torch_peak - single.torch_peak == 28672 * 8192 * 2


def test_tied_head_counts_once(tmp_path):
    tied = _write_config(tmp_path / "tied", **{**LLAMA3_8B, "num_hidden_layers": 2, "tie_word_embeddings": True})
    untied = _write_config(tmp_path / "untied", **{**LLAMA3_8B, "num_hidden_layers": 2})
    diff = (estimate(_cfg(untied), untied).component("embeddings_head_norms")
            - estimate(_cfg(tied), tied).component("embeddings_head_norms"))
    assert diff == 128256 * 4096 * 2


def test_loss_chunk_rows_follow_the_fused_loss():
    from qlorakit.train.loss import FUSED_CHUNK_TOKENS

    assert LOSS_CHUNK_ROWS == FUSED_CHUNK_TOKENS


def test_more_tokens_more_memory_and_kept_layers(tmp_path):
    from transformers import LlamaConfig

    from qlorakit.model.fused_blocks import layer_activation_bytes

    model_dir = _write_config(tmp_path / "m", **{**LLAMA3_8B, "num_hidden_layers": 4})
    short = estimate(_cfg(model_dir, training={"max_seq_length": 1024}), model_dir)
    long = estimate(_cfg(model_dir, training={"max_seq_length": 4096}), model_dir)
    assert long.torch_peak > short.torch_peak
    small, large = layer_activation_bytes(LlamaConfig(**LLAMA3_8B), 2 * 1024)
    keep_gib = (2 * small + 1000) / 2**30  # two layers' worth, far from a third or a gate/up output
    kept = estimate(_cfg(model_dir, training={"max_seq_length": 1024, "keep_activations_gib": keep_gib}), model_dir)
    # The last two layers keep their activations (keep_activations' plan): layer_activation_bytes, plus o_proj's
    # input (a copy of the attention output) and the seven x A^T products [T, r=64]; the first two their inputs.
    beyond = 2 * 1024 * 2 * (4096 + 7 * 64)
    assert kept.component("saved_activations") == 2 * (small + beyond) + 2 * (2 * 1024 * 4096 * 2)
    assert large - small > 1000


def test_offloaded_layer_inputs_move_to_the_host_but_the_highest_one(tmp_path):
    """training.offload_activations (model/offload.py): of L recomputed layers, L - 1 inputs wait in pinned host
    memory; the highest stays on the GPU, and backward holds one reloaded input ahead of the layer it is in."""
    model_dir = _write_config(tmp_path / "m", **{**LLAMA3_8B, "num_hidden_layers": 6})
    plain = estimate(_cfg(model_dir, training={"max_seq_length": 1024}), model_dir)
    off = estimate(_cfg(model_dir, training={"max_seq_length": 1024, "offload_activations": True}), model_dir)
    one_input = 2 * 1024 * 4096 * 2
    assert plain.component("saved_activations") == 6 * one_input
    assert off.component("saved_activations") == 1 * one_input
    # the prefetched next input, the reloaded one and its gradient (estimate.py, fitted to the H100 8B grid)
    assert off.component("layer_working_set") == plain.component("layer_working_set") + 3 * one_input
    host = {c.key: c.nbytes for c in off.host}
    assert host["offloaded_activations"] == 5 * one_input and "offloaded_activations" not in {c.key for c in plain.host}
    assert off.torch_peak < plain.torch_peak


def test_the_planner_keeps_what_fits_and_offloads_the_rest(tmp_path):
    from qlorakit.memory import plan

    model_dir = _write_config(tmp_path / "m", **{**LLAMA3_8B, "num_hidden_layers": 8})
    cfg = _cfg(model_dir, training={"max_seq_length": 2048, "batch_size": 1})
    lean = estimate(_cfg(model_dir, training={"max_seq_length": 2048, "batch_size": 1, "offload_activations": True,
                                              "gradient_checkpointing": True}), model_dir)
    kept = []
    for extra_gib in (0.1, 1.0, 3.0):
        budget = lean.device_peak / 2**30 + extra_gib
        chosen = plan(cfg, model_dir, budget)
        t = chosen.config.training
        assert t.gradient_checkpointing and t.offload_activations
        assert chosen.estimate.device_peak <= budget * 2**30
        kept.append(t.keep_activations_gib)
        assert "memory plan for training.memory_budget_gib" in chosen.line()
    assert kept[0] < kept[1] < kept[2]
    # One more 1/64 GiB of kept activations would not fit: the bisection stops at the budget.
    more = _cfg(model_dir, training={"max_seq_length": 2048, "batch_size": 1, "offload_activations": True,
                                     "keep_activations_gib": kept[1] + 0.2})
    assert estimate(more, model_dir).device_peak > (lean.device_peak / 2**30 + 1.0) * 2**30


def test_a_torch_bound_beside_the_device_budget_keeps_the_torch_peak_under_it_too(tmp_path):
    from qlorakit.memory import plan

    model_dir = _write_config(tmp_path / "m", **{**LLAMA3_8B, "num_hidden_layers": 8})
    cfg = _cfg(model_dir, training={"max_seq_length": 2048, "batch_size": 1})
    free = plan(cfg, model_dir, 12.0, host_free=0)  # the device budget alone
    bound = free.estimate.torch_peak / 2**30 - 0.5
    both = plan(cfg, model_dir, 12.0, host_free=0, torch_budget_gib=bound)
    assert free.estimate.device_peak <= 12.0 * 2**30 and free.estimate.torch_peak > bound * 2**30
    assert both.estimate.torch_peak <= bound * 2**30 and both.estimate.device_peak <= 12.0 * 2**30
    assert both.config.training.keep_activations_gib < free.config.training.keep_activations_gib


def test_a_budget_nothing_fits_is_refused_before_loading_with_what_would(tmp_path):
    from qlorakit.errors import QloraConfigError
    from qlorakit.memory import plan

    model_dir = _write_config(tmp_path / "m", **{**LLAMA3_8B, "num_hidden_layers": 8})
    cfg = _cfg(model_dir, training={"max_seq_length": 8192, "batch_size": 8, "optimizer": "adamw_32bit"})
    # 5.06 GiB with everything the planner may change (offloaded inputs and states, host tables, batch 1 x 8)
    with pytest.raises(QloraConfigError, match="even with every layer recomputed and its input offloaded, .*"
                                              "optimizer offload_adamw_32bit, micro-batches of 1 x 8 accumulated, "
                                              "the estimated device peak is 5.06 GiB; what would fit: .*--set") as err:
        plan(cfg, model_dir, 4.8)
    assert "\n" not in str(err.value)
    with pytest.raises(QloraConfigError, match="nothing qlorakit can change fits \\(the least any change reaches "
                                              "is .* GiB\\): a larger GPU is needed"):
        plan(cfg, model_dir, 1.0)


def test_a_training_run_says_its_estimate_and_its_plan_before_loading(tiny_model_dir, pattern_data, tmp_path,
                                                                       caplog):
    import logging

    from pipeline_helpers import run_tree

    from qlorakit.config import config_from_dict
    from qlorakit.train.run import run_training

    tree = run_tree(tiny_model_dir, pattern_data, tmp_path / "plain", training={"max_steps": 1})
    with caplog.at_level(logging.INFO, logger="qlorakit.train"):
        run_training(config_from_dict(tree), progress=False)
    assert "memory estimate:" in caplog.text and "GiB torch peak" in caplog.text
    caplog.clear()
    tree = run_tree(tiny_model_dir, pattern_data, tmp_path / "planned",
                    training={"max_steps": 1, "memory_budget_gib": 8.0})
    with caplog.at_level(logging.INFO, logger="qlorakit.train"):
        out = run_training(config_from_dict(tree), progress=False)
    assert "memory plan for training.memory_budget_gib=8: gradient_checkpointing=True" in caplog.text
    assert out.result.steps == 1
    assert caplog.text.index("memory plan") < caplog.text.index("qlorakit: loaded")  # before the model loads


@pytest.fixture
def tiny_yaml(tmp_path, tiny_model_dir):
    tree = {"model": {"name": str(tiny_model_dir)}, "lora": {"rank": 8},
            "training": {"batch_size": 2, "max_seq_length": 64, "optimizer": "adamw_32bit"}}
    return write_yaml(tmp_path / "run.yaml", tree)


def test_cli_table(tiny_yaml, capsys):
    assert cli.main(["estimate", str(tiny_yaml)]) == 0
    out = capsys.readouterr().out
    for text in ("4-bit weights (nf4, 14 linears)", "quantization constants", "LoRA adapters (r=8, 14 linears)",
                 "torch peak", "device peak (as NVML shows it)", "LoRA, 16-bit base", "full fine-tuning, 16-bit"):
        assert text in out, text
    row = next(line for line in out.splitlines() if line.startswith("device peak"))
    assert row.split()[-1].count(".") == 1 and len(row.split()[-1].split(".")[1]) == 2


def test_cli_json_matches_the_api(tiny_yaml, tiny_model_dir, capsys):
    assert cli.main(["estimate", str(tiny_yaml), "--json", "--set", "lora.rank=16"]) == 0
    record = json.loads(capsys.readouterr().out)
    from qlorakit.config import load_config

    est = estimate(load_config(tiny_yaml, ["lora.rank=16"]), tiny_model_dir)
    assert record["torch_peak_gib"] == round(est.torch_peak / 2**30, 4)
    assert record["device_peak_gib"] == round(est.device_peak / 2**30, 4)
    assert {k: v["bytes"] for k, v in record["components"].items()} == {c.key: c.nbytes for c in est.components}
    assert set(record["comparisons"]) == {"qlora_nf4", "lora_16bit", "full_16bit"}
    assert "loading" in record["host"] and record["assumptions"]["loss_chunk_rows"] == 2048
    assert "budget" not in record


def test_budget_that_fits_and_one_that_needs_a_change(tmp_path, tiny_model_dir, capsys):
    """Batch 8 of 4096 packed tokens: the [8, 1, 4096, 4096] bf16 attention mask (256 MiB) dominates; a budget just
    under the peak is met by halving the batch (accumulation doubled: the same effective batch)."""
    tree = {"model": {"name": str(tiny_model_dir)},
            "training": {"batch_size": 8, "max_seq_length": 4096, "gradient_accumulation": 2}}
    path = write_yaml(tmp_path / "big.yaml", tree)
    cfg = config_from_dict(tree)
    peak = estimate(cfg, tiny_model_dir).device_peak / 2**30
    assert estimate(cfg, tiny_model_dir).component("attention_mask") == 8 * 4096 * 4096 * 2

    assert cli.main(["estimate", str(path), "--memory-budget", f"{peak + 1:.3f}"]) == 0
    assert "fits: device peak" in capsys.readouterr().out

    budget = peak - 0.05
    fit = suggest(cfg, tiny_model_dir, budget)
    assert not fit.fits
    first = fit.options[0]
    assert first.changes == {"training.batch_size": 4, "training.gradient_accumulation": 4}
    assert first.device_peak <= budget * 2**30
    again = estimate(config_from_dict({**tree, "training": {**tree["training"], "batch_size": 4,
                                                            "gradient_accumulation": 4}}), tiny_model_dir)
    assert again.device_peak == first.device_peak
    assert cli.main(["estimate", str(path), "--memory-budget", f"{budget:.3f}", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["budget"]
    assert record["fits"] is False and record["options"][0]["set"] == first.changes
    assert cli.main(["estimate", str(path), "--memory-budget", f"{budget:.3f}"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "--set training.batch_size=4 --set training.gradient_accumulation=4" in out


def test_budget_nothing_fits_and_combinations(tmp_path):
    model_dir = _write_config(tmp_path / "llama3-8b", **LLAMA3_8B)
    cfg = _cfg(model_dir, training={"batch_size": 4, "max_seq_length": 2048, "gradient_accumulation": 4})
    fit = suggest(cfg, model_dir, 2.0)  # the 4-bit weights alone are 3.25 GiB
    assert not fit.fits and not fit.options and fit.combined is None and fit.floor > 2 * 2**30
    assert "nothing qlorakit can change fits" in "\n".join(fit.lines())
    fit = suggest(cfg, model_dir, 8.0)
    assert not fit.options and fit.combined is not None and fit.combined.device_peak <= 8 * 2**30
    assert len(fit.combined.changes) > 1


def test_bad_input_is_one_line(tmp_path, tiny_yaml, capsys):
    assert cli.main(["estimate", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in one_error_line(capsys)

    assert cli.main(["estimate", str(tiny_yaml), "--set", f"model.name={tmp_path / 'no-such-model'}"]) == 2
    assert "folder not found" in one_error_line(capsys)

    (tmp_path / "empty").mkdir()
    assert cli.main(["estimate", str(tiny_yaml), "--set", f"model.name={tmp_path / 'empty'}"]) == 2
    assert "no config.json" in one_error_line(capsys)

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "no-such-type"}))
    assert cli.main(["estimate", str(tiny_yaml), "--set", f"model.name={odd}"]) == 2
    assert "config.json" in one_error_line(capsys)

    assert cli.main(["estimate", str(tiny_yaml), "--set", "lora.target_modules=[nope_proj]"]) == 2
    assert "'nope_proj' matches no linear layer" in one_error_line(capsys)

    for bad in ("-1", "0", "nan", "inf"):
        assert cli.main(["estimate", str(tiny_yaml), "--memory-budget", bad]) == 2
        assert f"--memory-budget {bad}: allowed a finite number of GiB > 0" in one_error_line(capsys)


def test_the_planner_moves_states_and_splits_micro_batches_before_refusing(tmp_path):
    """Result-preserving steps come before a refusal: optimizer states to pinned host memory (the same AdamW),
    then smaller micro-batches with more accumulation (the same effective batch)."""
    from qlorakit.memory import plan

    model_dir = _write_config(tmp_path / "m", **{**LLAMA3_8B, "num_hidden_layers": 8})
    cfg = _cfg(model_dir, training={"max_seq_length": 4096, "batch_size": 4, "gradient_accumulation": 2})
    lean = _cfg(model_dir, training={"max_seq_length": 4096, "batch_size": 1, "gradient_accumulation": 8,
                                     "optimizer": "offload_adamw_32bit", "offload_activations": True,
                                     "embeddings_on_host": True, "head_on_host": True, "stacked_dequant": False})
    budget = estimate(lean, model_dir).device_peak / 2**30 + 0.01
    chosen = plan(cfg, model_dir, budget)
    t = chosen.config.training
    assert t.optimizer == "offload_adamw_32bit" and t.max_grad_norm == cfg.training.max_grad_norm
    assert (t.batch_size, t.gradient_accumulation) == (1, 8)  # 4 x 2 kept as 1 x 8
    assert t.embeddings_on_host and t.head_on_host and not t.stacked_dequant
    assert chosen.estimate.device_peak <= budget * 2**30
    # with room for batch 2 the planner stops halving there
    two = _cfg(model_dir, training={"max_seq_length": 4096, "batch_size": 2, "gradient_accumulation": 4,
                                    "optimizer": "offload_adamw_32bit", "offload_activations": True,
                                    "embeddings_on_host": True, "head_on_host": True, "stacked_dequant": False})
    chosen = plan(cfg, model_dir, estimate(two, model_dir).device_peak / 2**30 + 0.01)
    assert (chosen.config.training.batch_size, chosen.config.training.gradient_accumulation) == (2, 4)


def test_a_gpu_run_without_a_budget_is_planned_for_the_free_memory_unless_it_sets_planned_keys(
        tmp_path, monkeypatch, caplog):
    """training.memory_budget_gib's default on a GPU: the card's free memory less 5% and 0.5 GiB (here a stand-in
    for torch.cuda.mem_get_info; the planner reads config.json only). A config that sets a key the planner would
    set runs as written; a card too small is refused before loading, naming its free memory."""
    import torch

    from qlorakit.errors import QloraConfigError
    from qlorakit.memory.plan import default_budget_gib
    from qlorakit.train.run import _plan_memory
    from qlorakit.train.runtime import Runtime

    assert default_budget_gib(10 * 2**30) == pytest.approx(10 * 0.95 - 0.5)
    model_dir = _write_config(tmp_path / "m", **{**LLAMA3_8B, "num_hidden_layers": 8})
    runtime = Runtime(torch.device("cuda"), torch.bfloat16, torch.float32)
    free = {"bytes": 40 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    caplog.set_level("INFO", logger="qlorakit")
    plain = config_from_dict({"model": {"name": str(model_dir)}, "lora": {"rank": 64},
                              "training": {"max_seq_length": 2048}})
    planned, est = _plan_memory(plain, model_dir, runtime)
    assert planned.training.keep_activations_gib > 0 and est.device_peak <= default_budget_gib(free["bytes"]) * 2**30
    assert "the default budget: 40.00 GiB free on the GPU" in caplog.text
    as_written = config_from_dict({"model": {"name": str(model_dir)}, "lora": {"rank": 64},
                                   "training": {"max_seq_length": 2048, "keep_activations_gib": 0.0}})
    assert _plan_memory(as_written, model_dir, runtime)[0] is as_written
    free["bytes"] = 2 * 2**30
    with pytest.raises(QloraConfigError, match="this GPU has 2.00 GiB free, so the run may use 1.40 GiB"):
        _plan_memory(plain, model_dir, runtime)
    assert _plan_memory(plain, model_dir, Runtime(torch.device("cpu"), torch.float32, torch.float32))[0] is plain
