"""One configuration schema for YAML files, `--set` overrides on the command line, and Python.

Everything is checked when the file is read, before any model is loaded: unknown or misspelt keys, wrong types
and impossible combinations raise QloraConfigError naming the key and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import QloraConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field("default", description="local Hugging Face folder, a hub id already in the local cache, "
                      "or 'default' for the bundled SmolLM2-135M-Instruct")
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    kernels: Literal["auto", "reference", "triton"] = Field(
        "auto", description="what computes the 4-bit operations: 'auto' the Triton kernels on CUDA and the PyTorch "
        "reference elsewhere, 'reference' always the reference (the specification; slow on a GPU), 'triton' always "
        "Triton (an error where an operation has none). The environment variable QLORAKIT_KERNELS, a debugging "
        "switch, wins when set")
    cpu_dense_copies: bool = Field(
        True, description="on a CPU (no 4-bit kernels) keep one dequantized copy of each 4-bit linear, since "
        "dequantizing on every call costs as much as the matmul; false: only the 4-bit weights (less memory, slow)")


def _power_of_two_block(v: int) -> int:
    if v < 32 or v > 4096 or v & (v - 1):
        raise ValueError("must be a power of two from 32 to 4096")
    return v


# The 4-bit settings' types, shared with `qlorakit quantize`'s options (options/commands.py).
QuantType = Literal["nf4", "fp4"]
ComputeDtypeName = Literal["bfloat16", "float16", "float32"]
Blocksize = Annotated[int, AfterValidator(_power_of_two_block)]


class QuantizationSection(_Section):
    load_in_4bit: bool = True
    quant_type: QuantType = Field("nf4", description="the 4-bit code: NF4 (for normally distributed weights) or FP4")
    compute_dtype: ComputeDtypeName = Field(
        "bfloat16", description="the dtype the 4-bit layers dequantize to and compute in")
    double_quant: bool = Field(
        True, description="quantize the fp32 absmax constants again, to 8 bits: 0.37 bits less per weight at "
        "blocksize 64")
    blocksize: Blocksize = Field(64, description="4-bit block size, a power of two in 32..4096")


class LoraSection(_Section):
    rank: int = Field(64, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_rslora: bool = False
    bias: Literal["none"] = "none"
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    adapter_dtype: Literal["float32", "bfloat16"] = "float32"
    init: Literal["default", "loftq"] = Field(
        "default", description="'default': A kaiming-uniform, B zero (the 4-bit base). 'loftq': A, B start at the "
        "rank-r correction of the 4-bit error W - dequant(quant(W)) that least moves outputs; needs 16-bit weights")
    loftq_calibration: Literal["gram", "diagonal", "none"] = Field("gram", description="init loftq: weigh the "
        "error by the linear's inputs on the first loftq_calibration_tokens training tokens (Gram, diagonal), or not")
    loftq_calibration_tokens: int = Field(2048, gt=0)

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


class TrainingSection(_Section):
    output_dir: str = "runs/qlora"
    seed: int = 42
    batch_size: int = Field(1, gt=0)
    gradient_accumulation: int = Field(16, gt=0)
    effective_batch_size: int | None = Field(
        None, gt=0, description="derived: batch_size x gradient_accumulation (the run prints it); if given, must agree")
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    objective: Literal["sft", "dpo", "ipo", "orpo", "simpo"] = Field(
        "sft", description="sft: next-token loss on the responses; dpo, ipo (with the base, adapters off, as the "
        "reference), orpo, simpo (no reference): preference tuning on prompt/chosen/rejected records, as TRL computes "
        "them (train/preference.py)")
    beta: float = Field(0.1, gt=0, description="preference objectives: TRL's beta (dpo/ipo: the KL strength; orpo: "
                        "the odds-ratio weight; simpo: the reward scale)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin (TRL's simpo_gamma)")
    reference_adapter: str | None = Field(
        None, description="dpo/ipo: a PEFT adapter folder (e.g. an SFT run's adapter, of this lora shape) that the "
        "policy starts from; a frozen copy of it on the base is the reference. Unset: a new adapter, the base is it")
    disable_dropout: bool | None = Field(
        None, description="LoRA dropout off while training (lora.dropout still names the adapter's setting). Unset: "
        "off for the preference objectives, as TRL's trainers default (the policy starts equal to its reference and "
        "its log-probs carry no dropout noise), on for sft")
    precompute_ref_logps: bool = Field(
        False, description="dpo/ipo: compute every pair's reference log-probs in one pass before training and keep "
        "them in the output folder (ref_logps.safetensors, reused while the data, base and reference are the same), "
        "so that no training step runs the reference forward (TRL's precompute_ref_log_probs)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="simpo: TRL's label_smoothing (the conservative "
                                   "loss); 0 elsewhere")
    share_prompts: bool = Field(False, description="preference objectives: run each pair's prompt once, both "
                                "responses attending to it (the same log-probs and gradients, fewer tokens; sdpa or "
                                "eager attention), not twice as TRL does. Off: no faster on an 8B step (README)")
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_8bit", "offload_adamw_32bit",
                       "offload_adamw_8bit", "host_adamw_32bit"] = Field(
        "paged_adamw_32bit", description="AdamW with 32- or 8-bit states in GPU memory (adamw_*), CUDA unified memory "
        "(paged_*), or pinned host memory streamed through the GPU (offload_*); host_adamw_32bit keeps the fp32 "
        "master weights and moments in pinned host memory and the adapters on the GPU in the compute dtype, and "
        "steps each adapter inside backward as soon as its gradient is complete (least GPU memory; no gradient "
        "clipping, single process)")
    paged_prefetch: Literal["auto", "always", "never"] = Field(
        "auto", description="paged optimizers: when to prefetch the states to the GPU before an update. 'auto' "
        "while the driver is evicting them (detected from the update's timing), 'always' before every update "
        "(~0.8 ms of driver time per GiB of states even when nothing moved), 'never' (evicted pages come back by "
        "page faults)")
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(0.3, gt=0)
    gradient_checkpointing: bool = True
    keep_activations_gib: float = Field(
        0.0, ge=0.0, description="with gradient_checkpointing: GiB of a micro-batch's activations (at batch_size x "
        "max_seq_length tokens) that fused Llama layers may keep for backward instead of recomputing them; the last "
        "layers that fit are not recomputed (faster), the rest are. 0 recomputes every layer (least memory)")
    host_activations_gib: float = Field(
        0.0, ge=0.0, description="with gradient_checkpointing: GiB of a micro-batch's activations that the fused "
        "Llama layers right below those keep_activations_gib keeps may hold in pinned host memory instead of "
        "being recomputed: each such layer's saved tensors are copied out on a side stream during forward and "
        "brought back one layer ahead in backward (the same gradients as keeping them; the bytes cross the host "
        "link twice per step, so it pays while the link keeps up with the compute); CUDA only")
    memory_budget_gib: float | None = Field(
        None, gt=0, description="GPU memory (GiB, as NVML counts it) the run may use: before the model loads, "
        "the estimator (qlorakit estimate) picks gradient checkpointing, offloaded layer inputs and as many layers "
        "keeping their activations as fit, for the most speed within it; a budget nothing fits is refused with "
        "what would fit. Unset on a GPU: the card's free memory less 5% and 0.5 GiB, unless the config sets any "
        "key the planner would (keep_activations_gib, offload_activations, optimizer, batch_size, ...), which then "
        "runs as written")
    offload_activations: bool = Field(
        False, description="with gradient_checkpointing: the input of every recomputed decoder layer waits for "
        "backward in pinned host memory instead of on the GPU (copied on a side stream, reloaded one layer ahead): "
        "batch x max_seq_length x hidden_size x 2 bytes less per layer, the same gradients; CUDA only")
    embeddings_on_host: bool = Field(
        False, description="keep the frozen input embedding table in pinned host memory and look the batch's "
        "tokens up on the CPU (vocab x hidden x 2 bytes less on the GPU: 0.49 GiB for Llama-2-70B, 0.98 GiB for "
        "Llama-3-8B; no measurable cost); not with tied embeddings; CUDA only")
    head_on_host: bool = Field(
        False, description="keep the frozen LM head in pinned host memory: it is copied to the GPU for each "
        "loss and freed after the loss's backward, so the backward through the layers, where a step peaks, runs "
        "without it (vocab x hidden x 2 bytes less at the peak); the copy costs about that many bytes over PCIe "
        "per micro-batch (~20 ms for Llama-2-70B, ~40 ms for Llama-3-8B); not with tied embeddings; CUDA only")
    stacked_dequant: bool = Field(
        True, description="fused groups (Q/K/V, gate/up) dequantize their weights into one workspace and run one "
        "matmul; false dequantizes and multiplies one weight at a time, so the workspace holds the largest single "
        "weight (Llama-2-70B: 0.44 GiB less on the GPU)")
    fused_blocks: bool = Field(
        True, description="run Llama attention Q/K/V and the gate/up/down MLP as fused 4-bit LoRA groups and "
        "RMSNorm through one-pass kernels (training and prefill); false keeps transformers' modules as they are")
    max_seq_length: int = Field(2048, ge=16)
    bf16: bool | None = Field(
        None, description="derived from quantization.compute_dtype (true for bfloat16); accepted for configs "
        "written for transformers' Trainer, and then it must agree")
    eval_every: int = Field(50, gt=0)
    save_every: int = Field(100, gt=0)
    log_every: int = Field(1, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    resume: bool | Literal["force"] = Field(
        True, description="continue from the newest intact checkpoint in output_dir; a checkpoint written with other "
        "settings that change the result (data, model, LoRA, batch, seed, optimizer, schedule) is refused with the "
        "list of differences; 'force' resumes anyway; false starts over (the old checkpoints are replaced)")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="under torchrun: 'auto' trains data-parallel when WORLD_SIZE > 1 (every rank holds "
        "the whole model); 'ddp' requires torchrun; 'fsdp' requires torchrun and shards the model, adapters, "
        "gradients and optimizer states over the ranks (FSDP2). Each rank takes gradient_accumulation / world_size of a step's micro-batches, so "
        "gradient_accumulation must be a multiple of the world size")

    @model_validator(mode="after")
    def _keep_needs_checkpointing(self) -> "TrainingSection":
        if self.keep_activations_gib > 0 and not self.gradient_checkpointing:
            raise ValueError("keep_activations_gib needs gradient_checkpointing: true (without checkpointing every "
                             "layer keeps all its activations anyway); drop one of them")
        if self.optimizer == "host_adamw_32bit" and self.max_grad_norm:
            raise ValueError(f"optimizer host_adamw_32bit steps each adapter inside backward, before the norm of all "
                             f"gradients exists, so it cannot clip by it: set max_grad_norm: null (it is "
                             f"{self.max_grad_norm:g}) or pick another optimizer")
        if self.host_activations_gib > 0 and not self.gradient_checkpointing:
            raise ValueError("host_activations_gib needs gradient_checkpointing: true (without checkpointing every "
                             "layer keeps all its activations on the GPU); drop one of them")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError("offload_activations needs gradient_checkpointing: true (it moves what checkpointing "
                             "keeps, the layer inputs); drop one of them")
        return self

    @model_validator(mode="after")
    def _effective_batch(self) -> "TrainingSection":
        product = self.batch_size * self.gradient_accumulation
        if self.effective_batch_size is not None and self.effective_batch_size != product:
            raise ValueError(
                f"effective_batch_size {self.effective_batch_size} != batch_size {self.batch_size} x "
                f"gradient_accumulation {self.gradient_accumulation} = {product}; drop it or make them agree"
            )
        return self


class DataSection(_Section):
    path: str = Field("default:seed_tasks", description="a local .json, .jsonl, .parquet or .csv file, or "
                      "'default:seed_tasks' / 'default:alpaca_eval' for the bundled sets")
    format: Literal["alpaca", "chat", "text"] = "alpaca"
    text_field: str = "text"
    messages_field: str = "messages"
    train_on_inputs: bool = False
    overlong: Literal["drop", "truncate"] = Field("drop", description="an alpaca or chat example longer than "
                                                  "training.max_seq_length is dropped, or cut to it")
    packing: bool = True
    eval_file: str | None = None
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_eval_examples: int | None = Field(None, gt=0)
    template: Literal["auto", "chat_template", "alpaca"] = "auto"
    cache_dir: str | None = None
    max_prompt_length: int | None = Field(None, gt=0, description="preference objectives: a prompt longer than "
                                          "this keeps its last tokens (then responses are cut to max_seq_length)")


class QloraConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    data: DataSection = Field(default_factory=DataSection)

    @model_validator(mode="after")
    def _combinations(self) -> "QloraConfig":
        q = self.quantization
        if not q.load_in_4bit and q.quant_type == "fp4":
            raise ValueError("quantization.quant_type 'fp4' needs quantization.load_in_4bit: true")
        t, d, lo = self.training, self.data, self.lora
        if t.objective != "sft":
            clash = [k for k, bad in (("data.format", "format" in d.model_fields_set), ("data.packing", d.packing
                     and "packing" in d.model_fields_set), ("training.distributed", t.distributed == "fsdp")) if bad]
            if clash:
                raise ValueError(f"training.objective {t.objective} reads prompt/chosen/rejected records, one pair "
                                 f"per row, without FSDP: drop {', '.join(clash)}")
        if lo.init == "loftq" and (not q.load_in_4bit or t.reference_adapter):
            raise ValueError("lora.init loftq starts from the 4-bit quantization error: it needs "
                             "quantization.load_in_4bit: true, and no training.reference_adapter to start from")
        stray = sorted(f"lora.{k}" for k in lo.model_dump(exclude_defaults=True) if k.startswith("loftq_"))
        if stray and lo.init != "loftq":
            raise ValueError(f"{', '.join(stray)}: for lora.init loftq only (lora.init is {lo.init})")
        if t.reference_adapter and t.objective not in ("dpo", "ipo"):
            raise ValueError(f"training.reference_adapter applies to objectives dpo and ipo, not {t.objective}")
        if t.precompute_ref_logps and t.objective not in ("dpo", "ipo"):
            raise ValueError(f"training.precompute_ref_logps applies to objectives dpo and ipo (the others have no "
                             f"reference), not {t.objective}")
        if t.label_smoothing and t.objective != "simpo":
            raise ValueError(f"training.label_smoothing applies to objective simpo, not {t.objective}")
        if t.bf16 is not None and t.bf16 != (q.compute_dtype == "bfloat16"):
            raise ValueError(f"training.bf16 is {str(t.bf16).lower()} but quantization.compute_dtype is "
                             f"{q.compute_dtype}; bf16: true goes with compute_dtype bfloat16, bf16: false with "
                             "float16 or float32")
        return self


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = QloraConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            lines.append(f"{source}: unknown key {key!r}{_suggest(str(loc[-1]), allowed)} "
                         f"(allowed here: {', '.join(allowed)})")
        elif e["type"] == "literal_error":
            lines.append(f"{source}: {key} = {e['input']!r} is not allowed; {e['msg'].replace('Input should be', 'use')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = "" if isinstance(e["input"], dict) else f" (got {e['input']!r})"
            lines.append(f"{source}: {key}: {msg}{shown}")
    return "; ".join(lines)


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise QloraConfigError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, e.g. training.learning_rate=1e-4")
    dotted, raw = assignment.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise QloraConfigError(f"--set {assignment!r}: the key must name a section and a key, e.g. lora.rank=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise QloraConfigError(f"--set {assignment!r}: value is not valid YAML ({err})") from None
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise QloraConfigError(f"--set {assignment!r}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _read_yaml(path: Path) -> Any:
    """The YAML document of `path`; QloraConfigError for text that is not UTF-8, not YAML, or that gives a key
    twice in one mapping (YAML would keep the last value silently)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise QloraConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                               "save the config as UTF-8") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _refuse_repeated_keys(root, path, (), set())
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise QloraConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def _refuse_repeated_keys(node: yaml.Node, path: Path, where: tuple[str, ...], seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked (aliases may even refer to themselves)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_repeated_keys(item, path, (*where, str(i)), seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key, value in node.value:
        name = str(key.value) if isinstance(key, yaml.ScalarNode) else None
        if name is not None and name in first_line:
            dotted = ".".join((*where, name))
            raise QloraConfigError(f"{path}: key {dotted!r} is given twice (lines {first_line[name]} and "
                                   f"{key.start_mark.line + 1}); keep one")
        if name is not None:
            first_line[name] = key.start_mark.line + 1
        _refuse_repeated_keys(value, path, (*where, name or "?"), seen)


def config_from_dict(tree: dict[str, Any], source: str = "config") -> QloraConfig:
    try:
        return QloraConfig.model_validate(tree)
    except ValidationError as err:
        raise QloraConfigError(_format_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> QloraConfig:
    """Read a YAML config (None: all defaults), apply `section.key=value` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise QloraConfigError(f"{p}: config file not found")
        loaded = _read_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise QloraConfigError(f"{p}: the top level must be a mapping of sections "
                                   f"(model, quantization, lora, training, data)")
        tree = loaded
    for assignment in overrides:
        _apply_override(tree, assignment)
    if overrides:
        source += " (with --set)"
    return config_from_dict(tree, source)


def dump_config(cfg: QloraConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
