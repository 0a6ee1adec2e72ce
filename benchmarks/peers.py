"""The peers' QLoRA training step, measured the way benchmarks/train_step.py measures qlorakit's, for its ratios.

    python3 benchmarks/peers.py bnb-peft unsloth [lora16-peft] [--shape llama3-8b] [--layers N]
                                [--batches 1x2048,4x2048] [--rank 64] [--dropout 0.05] [--steps 8]
                                [--out DIR] [--workdir DIR] [--device cuda|cpu] [--tiny]

Peers (each in a process of its own, one after another, so that no peer's patches to transformers, cached CUDA
blocks or CUDA context sit beside the next one and inflate its device-wide figure):
- bnb-peft: transformers + PEFT + bitsandbytes as the QLoRA paper's recipe (and our seed) sets them up: NF4 with
  double quantization and bf16 compute, prepare_model_for_kbit_training, non-reentrant gradient checkpointing,
  LoRA r=--rank alpha=16 on q/k/v/o/gate/up/down with dropout --dropout, bitsandbytes' PagedAdamW32bit.
- unsloth: Unsloth's FastLanguageModel on its fast path (4-bit load, LoRA dropout 0, its own "unsloth" gradient
  checkpointing), same rank, alpha, targets and optimizer.
- lora16-peft (optional): bnb-peft's recipe on a bf16 base instead of NF4 (plain LoRA; gradient checkpointing
  enabled directly, as prepare_model_for_kbit_training would upcast a 16-bit base to fp32), same optimizer.
- trl-dpo (preference tuning, benchmarks/dpo_step.py): bnb-peft's model and optimizer trained by TRL's own
  DPOTrainer (sigmoid loss, beta 0.1, the reference = the same model with its adapter disabled, TRL's default
  dropout-off). Here --batches BxT means B pairs per step, each pair a chosen and a rejected sequence of T tokens
  whose first --prompt-tokens are the shared prompt; the dataset is random token text through a word-level
  tokenizer, so every sequence tokenizes to exactly T tokens. Timed by a callback around each optimizer step
  (device synchronized); result keys "P{B}xT{T}" with pairs_per_s.

Model: the random-init Llama shape named by --shape, with its fields taken from qlorakit.model.synthetic.SHAPES
(the dictionary train_step.py builds qlorakit's model from, so the two cannot drift apart); --layers keeps the
first N layers. The peers load from a folder, so a bf16 checkpoint (plus a placeholder word-level tokenizer,
which Unsloth loads) is written once under --workdir by a process of its own and reused by later runs.

Loop, the same as train_step.py's: per step, random token ids are drawn (before the clock starts) as inputs and
labels; the forward runs under bf16 autocast and the loss counts every token (the mean over B*(T-1) predicted
positions); backward, gradient clipping to norm 0.3, optimizer step, zero_grad(set_to_none). The step time is
the median of the steps after the first 3 (warm-up), with the device synchronized around each step; tok/s is
B*T over that median. Memory, per batch shape: torch's peak allocated (reset, after emptying the cache, before
each shape) and the device-wide peak that NVML reports, sampled every 5 ms in a thread (bench_common.NvmlPeak).
The device-wide figure matters here: PagedAdamW's states live in CUDA managed memory, which torch's counter does
not see. MFU is not reported for peers (train_step.py prints NaN); the ratios use tok/s and the memory peaks.

Output: OUT/peers.json, one object keyed by peer, merged into whatever the file already holds as each peer's
process ends (rewritten atomically, so an interrupted run leaves the finished peers readable):
    {"bnb-peft": {"B1xT2048": {"tok_per_s", "step_s", "torch_peak_GiB", "nvml_peak_GiB", "loss"}, ...,
                  "versions": {...}, "weights_GiB", "trainable", ...},
     "unsloth": {"error": "one line"}}
A peer that cannot run (a package missing, out of memory, a crash) is recorded as {"error": ...}; the others
still run. Numbers are comparable only within one device call: the same shape on another call (another card,
another neighbour on the host) has moved bnb-peft's B1 speed by as much as a quarter.

On a GPU: the device image has torch, transformers, peft and accelerate, but neither bitsandbytes nor Unsloth
and the packages Unsloth needs beyond those. Put their wheels, built for the image's Python (3.12, x86_64), in
`.whl/` at the repository root (git ignores it): bitsandbytes 0.50.2 fetched with `pip download --no-deps
--only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2`, and
the Unsloth set kept in ../shared/bench/wheels/ (unsloth and unsloth_zoo 2026.10.9, trl, datasets,
cut_cross_entropy and their small dependencies) copied in. Carry `.whl` with the device tool, and in the same
command install them into a scratch folder and put it on the path before running this script (or train_step.py
with --peers bnb-peft,unsloth, which calls it):
    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
The first run of a shape writes its checkpoint to --workdir (16 GB for the 8B shape: mind the device's disk);
each peer then takes one to two minutes on the 8B shape.

`--device cpu --tiny` exists only to test this harness without a GPU (tests/test_peers_script.py): the model is
shrunk to about 100k parameters, bitsandbytes runs its CPU path (its paged optimizer falls back to an
ordinary one), there is no NVML and no CPU counter of torch's allocations (both peaks are null), Unsloth is
recorded as an error (it needs CUDA), and the timings say nothing about any GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Run as a script, Python puts benchmarks/ first on sys.path, where kernels.py would shadow the `kernels` package
# that bitsandbytes and transformers look for: the peers must import what they would import anywhere else.
if sys.path and Path(sys.path[0] or ".").resolve() == BENCH:
    del sys.path[0]

PEERS = ("bnb-peft", "lora16-peft", "unsloth", "trl-dpo")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_ALPHA = 16
LEARNING_RATE = 2e-4
MAX_GRAD_NORM = 0.3
WARMUP_STEPS = 3
# --tiny: the named shape's fields with the widths, depth and vocabulary shrunk (for the CPU harness test only).
TINY_FIELDS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=256, max_position_embeddings=512, num_hidden_layers=2)
# The placeholder tokenizer's special tokens, at the ids LlamaConfig expects (bos 1, eos 2) and with a pad token
# of its own, so that no peer adds one and resizes the embeddings.
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
VERSIONED = ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "unsloth", "unsloth_zoo")


class PeerUnavailable(RuntimeError):
    """A peer that cannot run in this setting (recorded as its error, not a crash)."""


# ---------------------------------------------------------------- shapes and the shared checkpoint (parent side)

def parse_batches(text: str) -> list[tuple[int, int]]:
    """'1x2048,4x2048' -> [(1, 2048), (4, 2048)]: batch size and sequence length of each measured shape."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        b, _, t = item.partition("x")
        pairs.append((int(b), int(t)))
    if not pairs:
        raise SystemExit(f"--batches: no BxT in {text!r}")
    return pairs


def model_fields(shape: str, layers: int, tiny: bool) -> dict[str, Any]:
    """The LlamaConfig fields of the measured model: qlorakit's SHAPES entry, shrunk with --tiny, cut to --layers."""
    sys.path.insert(0, str(ROOT / "src"))
    from qlorakit.model.synthetic import SHAPES

    if shape not in SHAPES:
        raise SystemExit(f"--shape {shape!r}: not one of qlorakit.model.synthetic.SHAPES ({', '.join(SHAPES)})")
    fields = dict(SHAPES[shape])
    if tiny:
        fields.update(TINY_FIELDS)
    if layers:
        fields["num_hidden_layers"] = layers
    return fields


def checkpoint_dir(args: argparse.Namespace, fields: dict[str, Any]) -> Path:
    """Where this shape's random-init checkpoint lives: one folder per shape, variant and layer count."""
    name = f"{args.shape}{'-tiny' if args.tiny else ''}-{fields['num_hidden_layers']}L"
    return Path(args.workdir) / name


def write_checkpoint(fields: dict[str, Any], folder: Path, device: str) -> None:
    """Draws a random-init bf16 LlamaForCausalLM of `fields` on `device` (seed 0, transformers' N(0, 0.02) init)
    and saves it with a placeholder tokenizer into a temporary folder, renamed into place when complete."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    config = LlamaConfig(**fields, bos_token_id=specials.index("<s>"), eos_token_id=specials.index("</s>"),
                         pad_token_id=specials.index("<pad>"))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    model.save_pretrained(staging, max_shard_size="5GB")
    del model
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"tok{i}": i for i in range(len(specials), fields["vocab_size"])})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS).save_pretrained(staging)
    os.replace(staging, folder)


# ---------------------------------------------------------------- one peer (child side)

def load_bnb_peft(folder: Path, args: argparse.Namespace, device_map: dict, four_bit: bool = True):
    """bnb-peft (four_bit) or lora16-peft: the model, its trainable parameters and the optimizer."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = dict(device_map=device_map, dtype=torch.bfloat16, attn_implementation="sdpa")
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    weights = allocated_gib(args.device)
    if four_bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:  # prepare_model_for_kbit_training would cast the 16-bit base to fp32
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=args.rank, lora_alpha=LORA_ALPHA, lora_dropout=args.dropout, target_modules=TARGET_MODULES,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, bnb.optim.PagedAdamW32bit(params, lr=LEARNING_RATE), weights


def load_unsloth(folder: Path, args: argparse.Namespace):
    """unsloth: FastLanguageModel in 4 bits, LoRA dropout 0 and its own checkpointing (its fast path)."""
    if args.device != "cuda":
        raise PeerUnavailable("unsloth needs CUDA (its kernels are Triton on the GPU); not measured on CPU")
    from unsloth import FastLanguageModel  # before transformers and peft: Unsloth patches them on import

    import bitsandbytes as bnb
    import torch

    max_len = max(t for _, t in parse_batches(args.batches))
    model, _tokenizer = FastLanguageModel.from_pretrained(str(folder), max_seq_length=max_len, load_in_4bit=True,
                                                          dtype=torch.bfloat16)
    weights = allocated_gib(args.device)
    model = FastLanguageModel.get_peft_model(model, r=args.rank, lora_alpha=LORA_ALPHA, lora_dropout=0,
                                             target_modules=TARGET_MODULES, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=0)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, bnb.optim.PagedAdamW32bit(params, lr=LEARNING_RATE), weights


def allocated_gib(device: str) -> float | None:
    """torch's currently allocated device memory in GiB (None on CPU, where torch keeps no such counter)."""
    import torch

    return round(torch.cuda.memory_allocated() / 2**30, 2) if device == "cuda" else None


def train_steps(model, params: list, optimizer, args: argparse.Namespace, vocab_size: int) -> dict[str, dict]:
    """The measured loop, per batch shape; see the module docstring. Returns {"B{B}xT{T}": results}."""
    import torch

    cuda = args.device == "cuda"
    if cuda:  # the sampler train_step.py uses, loaded by path (benchmarks/ is not on sys.path, see above)
        spec = importlib.util.spec_from_file_location("bench_common", BENCH / "bench_common.py")
        bench_common = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_common)
        NvmlPeak = bench_common.NvmlPeak
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.train()
    results = {}
    for B, T in parse_batches(args.batches):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times: list[float] = []
        with NvmlPeak() if cuda else contextlib.nullcontext() as nvml:
            for _ in range(args.steps):
                ids = torch.randint(0, vocab_size, (B, T), device=args.device)
                sync()
                start = time.perf_counter()
                with torch.autocast(args.device, dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss  # mean over the B*(T-1) shifted labels
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                times.append(time.perf_counter() - start)
        timed = sorted(times[WARMUP_STEPS:] or times)  # --steps <= 3: all of them (timed_steps 0)
        step_s = timed[len(timed) // 2]
        results[f"B{B}xT{T}"] = dict(
            step_s=round(step_s, 4), tok_per_s=round(B * T / step_s, 1),
            torch_peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            nvml_peak_GiB=round(nvml.peak / 2**30, 2) if nvml is not None else None,
            loss=round(float(loss.detach()), 3), timed_steps=len(times[WARMUP_STEPS:]))
        print(f"{args.child} B{B}xT{T}: {results[f'B{B}xT{T}']}", flush=True)
    return results


def word_tokenizer(vocab_size: int):
    """The checkpoint's placeholder vocabulary ('tok{i}' words) with a whitespace pre-tokenizer, so that text made
    of those words tokenizes to exactly one id per word (TRL's DPOTrainer tokenizes text itself)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"tok{i}": i for i in range(len(specials), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def random_pairs(n: int, seq: int, prompt: int, vocab_size: int, seed: int = 0) -> list[dict[str, str]]:
    """n preference records of random words: a prompt of `prompt` words, chosen and rejected of seq - prompt
    words each, the last being the EOS token (so TRL appends none)."""
    import random

    rng = random.Random(seed)
    first = len(SPECIAL_TOKENS)

    def words(k: int) -> str:
        return " ".join(f"tok{rng.randrange(first, vocab_size)}" for _ in range(k))

    eos = SPECIAL_TOKENS["eos_token"]
    return [{"prompt": words(prompt), "chosen": f" {words(seq - prompt - 1)} {eos}",
             "rejected": f" {words(seq - prompt - 1)} {eos}"} for _ in range(n)]


def measure_trl_dpo(folder: Path, args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """trl-dpo (module docstring): for each --batches entry, one DPOTrainer over the same PEFT model."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device_map = {"": 0} if args.device == "cuda" else {"": "cpu"}
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", quantization_config=quant)
    weights = allocated_gib(args.device)
    lora = LoraConfig(r=args.rank, lora_alpha=LORA_ALPHA, lora_dropout=args.dropout, target_modules=TARGET_MODULES,
                      bias="none", task_type="CAUSAL_LM")
    tokenizer = word_tokenizer(vocab_size)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        spec = importlib.util.spec_from_file_location("bench_common", BENCH / "bench_common.py")
        bench_common = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_common)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *_args, **_kw):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *_args, **_kw):
            sync()
            self.times.append(time.perf_counter() - self.start)

    info: dict[str, Any] = {"weights_GiB": weights, "rank": args.rank, "lora_dropout": "off (TRL's disable_dropout)",
                            "optimizer": "paged_adamw_32bit (TRL's optim)", "checkpoint": folder.name,
                            "loss_type": "sigmoid", "beta": 0.1, "prompt_tokens": args.prompt_tokens,
                            "setup": "DPOTrainer(model=<4-bit model>, peft_config=LoraConfig(...)): TRL wraps it, "
                                     "casts the adapters to bf16, reference = adapter disabled"}
    with tempfile.TemporaryDirectory(prefix="trl-dpo.", dir=args.workdir) as scratch:
        for P, T in parse_batches(args.batches):
            data = datasets.Dataset.from_list(random_pairs(P * args.steps, T, args.prompt_tokens, vocab_size))
            config = DPOConfig(output_dir=scratch, per_device_train_batch_size=P, gradient_accumulation_steps=1,
                               max_steps=args.steps, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
                               warmup_steps=0, max_grad_norm=MAX_GRAD_NORM, bf16=cuda, gradient_checkpointing=True,
                               gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=T, beta=0.1,
                               loss_type=["sigmoid"], logging_steps=10**6, save_strategy="no", report_to=[],
                               dataloader_num_workers=0, seed=0, use_cpu=not cuda, optim="paged_adamw_32bit")
            clock = StepClock()
            trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                 peft_config=lora, callbacks=[clock])
            info["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with bench_common.NvmlPeak() if cuda else contextlib.nullcontext() as nvml:
                out = trainer.train()
            timed = sorted(clock.times[WARMUP_STEPS:] or clock.times)
            step_s = timed[len(timed) // 2]
            key = f"P{P}xT{T}"
            info[key] = dict(step_s=round(step_s, 4), pairs_per_s=round(P / step_s, 3),
                             tok_per_s=round(2 * P * T / step_s, 1),
                             torch_peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                             nvml_peak_GiB=round(nvml.peak / 2**30, 2) if nvml is not None else None,
                             train_loss=round(float(out.training_loss), 4), steps=len(clock.times),
                             timed_steps=len(clock.times[WARMUP_STEPS:]))
            print(f"trl-dpo {key}: {info[key]}", flush=True)
            model = trainer.model.unload()  # the 4-bit base again, for the next shape's fresh adapter
            del trainer
    info["versions"] = versions(args.device)
    return info


def versions(device: str) -> dict[str, str | None]:
    """Package versions, Python and the device's name, so a table row says what produced it."""
    import importlib.metadata

    import torch

    found: dict[str, str | None] = {}
    for package in VERSIONED:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["python"] = platform.python_version()
    found["device"] = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.machine()})"
    return found


def measure_peer(args: argparse.Namespace) -> dict[str, Any]:
    """In the child process: loads `args.child` from the shared checkpoint and measures its training step."""
    folder = Path(args.checkpoint)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    if args.child == "trl-dpo":
        return measure_trl_dpo(folder, args, vocab_size)
    if args.child == "unsloth":
        model, params, optimizer, weights = load_unsloth(folder, args)
    else:
        device_map = {"": 0} if args.device == "cuda" else {"": "cpu"}
        model, params, optimizer, weights = load_bnb_peft(folder, args, device_map,
                                                          four_bit=args.child == "bnb-peft")
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != vocab_size:  # a resized vocabulary would change the LM head's cost: not the same model any more
        raise PeerUnavailable(f"{args.child} resized the embeddings from {vocab_size} to {rows} rows")
    dropout = 0.0 if args.child == "unsloth" else args.dropout
    info: dict[str, Any] = {"weights_GiB": weights, "trainable": sum(p.numel() for p in params),
                            "rank": args.rank, "lora_dropout": dropout, "optimizer": type(optimizer).__name__,
                            "checkpoint": folder.name, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    info.update(train_steps(model, params, optimizer, args, vocab_size))
    info["versions"] = versions(args.device)
    return info


def child_main(args: argparse.Namespace) -> int:
    """One peer in this process; writes {"error": ...} instead of results when it fails, and exits nonzero."""
    try:
        result = measure_peer(args)
        code = 0
    except Exception as err:  # noqa: BLE001 - any failure becomes the peer's one-line error in the table
        traceback.print_exc()
        text = str(err).strip().splitlines()
        result = {"error": f"{type(err).__name__}: {text[0] if text else ''}".strip()}
        code = 1
    write_json(Path(args.result), result)
    return code


# ---------------------------------------------------------------- the parent: checkpoint, peers, peers.json

def write_json(path: Path, value: Any) -> None:
    """Writes `value` as JSON to `path` atomically (a temporary file beside it, renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def merge_result(out: Path, peer: str, result: dict[str, Any]) -> None:
    """Sets `peer`'s entry in OUT/peers.json, keeping the other peers already there."""
    path = out / "peers.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged[peer] = result
    write_json(path, merged)


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """The peers' environment: offline, no usage statistics, Unsloth's compiled cache under --workdir."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1",
                UNSLOTH_COMPILE_LOCATION=str(Path(args.workdir) / "unsloth_compiled_cache"),
                TOKENIZERS_PARALLELISM="false")


def forwarded_options(args: argparse.Namespace) -> list[str]:
    """The options a child needs to rebuild the same setting."""
    return ["--shape", args.shape, "--layers", str(args.layers), "--batches", args.batches, "--rank",
            str(args.rank), "--dropout", str(args.dropout), "--steps", str(args.steps), "--out", args.out,
            "--workdir", args.workdir, "--device", args.device, "--prompt-tokens", str(args.prompt_tokens)] + \
        (["--tiny"] if args.tiny else [])


def run_child(extra: list[str], args: argparse.Namespace, result_path: Path) -> dict[str, Any]:
    """Runs this script once more with `extra` and returns what it wrote to `result_path`, or an error."""
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra, *forwarded_options(args),
           "--result", str(result_path)]
    proc = subprocess.run(cmd, env=child_env(args), check=False)
    if result_path.exists():
        return json.loads(result_path.read_text())
    return {"error": f"process exited with code {proc.returncode} before writing a result (killed? see its log)"}


def parent_main(args: argparse.Namespace) -> int:
    """Writes the checkpoint if missing, then measures each peer in turn and merges it into OUT/peers.json."""
    out, workdir = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    fields = model_fields(args.shape, args.layers, args.tiny)
    folder = checkpoint_dir(args, fields)
    peers = list(dict.fromkeys(args.peers))  # in the order given, each once
    failed = 0
    with tempfile.TemporaryDirectory(prefix="results.", dir=workdir) as scratch:
        if not folder.exists():
            made = run_child(["--make-checkpoint", str(folder)], args, Path(scratch) / "checkpoint.json")
            if "error" in made:
                for peer in peers:
                    merge_result(out, peer, {"error": f"checkpoint: {made['error']}"})
                return 1
        for peer in peers:
            print(f"peers: {peer} on {folder.name}, batches {args.batches}", flush=True)
            result = run_child(["--child", peer, "--checkpoint", str(folder)], args,
                               Path(scratch) / f"{peer}.json")
            merge_result(out, peer, result)
            failed += "error" in result
            print(f"peers: {peer}: {result.get('error', 'measured')}", flush=True)
    print(f"peers: wrote {out / 'peers.json'}", flush=True)
    return 1 if failed == len(peers) else 0  # some peer measured: the others' errors are in the JSON


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line. --shape is checked against SHAPES by the parent (model_fields), not here: a peer's
    process must not import qlorakit (Unsloth wants to be imported before transformers)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peers", nargs="*", metavar="PEER", help=f"peers to measure, in this order: {', '.join(PEERS)}")
    ap.add_argument("--shape", default="llama3-8b", help="a qlorakit.model.synthetic.SHAPES name")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0: all of the shape's)")
    ap.add_argument("--batches", default="1x2048,4x2048", help="comma-separated BxT to measure")
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha is 16)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of bnb-peft and lora16-peft "
                    "(unsloth's fast path needs 0)")
    ap.add_argument("--steps", type=int, default=8, help=f"steps per batch shape; the first {WARMUP_STEPS} are "
                    "warm-up, the median of the rest is reported")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="peers.json goes here")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "qlorakit-peers"),
                    help="the random-init checkpoint is written here once and reused")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="trl-dpo: the prompt's share of each T")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu only tests the harness")
    ap.add_argument("--tiny", action="store_true", help="shrink the shape to a toy model (harness tests on CPU)")
    ap.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--make-checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    parse_batches(args.batches)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if not (args.peers or args.child or args.make_checkpoint):
        ap.error(f"name at least one peer: {', '.join(PEERS)}")
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        ap.error(f"unknown peer {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_checkpoint:
        try:
            fields = model_fields(args.shape, args.layers, args.tiny)
            write_checkpoint(fields, Path(args.make_checkpoint), args.device)
            result: dict[str, Any] = {"checkpoint": args.make_checkpoint}
        except Exception as err:  # noqa: BLE001 - reported to the parent, which records it for every peer
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"}
        write_json(Path(args.result), result)
        return 1 if "error" in result else 0
    if args.child:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
