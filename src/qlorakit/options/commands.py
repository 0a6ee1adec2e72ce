"""The options of `qlorakit quantize`, `generate`, `chat`, `serve`, `pairs`, `inspect` and `eval`: one model per
command, one field per flag, each with its type, default, allowed values and help. cli.py generates the commands'
flags from these (options/flags.py), and Python callers build the same models, so a value is checked alike wherever
it comes from.

`quantize`'s 4-bit settings are the training config's (config.py QuantizationSection): the YAML key, its `--set`
override and the flag share one type, default and description. `train` and `estimate` take the config itself.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from ..config import Blocksize, ComputeDtypeName, DataSection, QuantizationSection, QuantType, TrainingSection
from .base import CommandOptions, option
from .model_spec import SYNTAX, ModelSpec, parse_model_specs

# Rows of one decoding batch; infer/serve.py's MAX_ROWS, which the tests hold equal to it (infer/ is a layer above).
MAX_BATCH = 64


def _quantization(name: str, **shown: Any) -> Any:
    """The training config's `quantization.<name>` as an option: its default and description."""
    field = QuantizationSection.model_fields[name]
    return option(field.default, field.description or "", **shown)


def _data(name: str, description: str) -> Any:
    """The training config's `data.<name>` as an option of `eval --data`: its default, this description."""
    return option(DataSection.model_fields[name].default, description)


def _model() -> Any:
    return option("default", "base model: a local folder, a hub id in the local cache, or 'default' "
                  "(SmolLM2-135M-Instruct)")


def _device() -> Any:
    return option(None, "cuda, cpu, ... (default: cuda when available)")


class QuantizeOptions(CommandOptions):
    """`qlorakit quantize MODEL_DIR OUT_DIR`; the fields are model/quantize_checkpoint.py's arguments."""

    model_dir: str = option(description="a local Hugging Face causal-LM folder (config.json + *.safetensors)",
                            positional=True)
    out_dir: str = option(description="where to write the quantized checkpoint (must not exist unless --overwrite)",
                          positional=True)
    quant_type: QuantType = _quantization("quant_type")
    blocksize: Blocksize = _quantization("blocksize")
    double_quant: bool = _quantization("double_quant", off="keep fp32 absmax constants")
    compute_dtype: ComputeDtypeName = _quantization("compute_dtype")
    overwrite: bool = option(False, "replace out_dir if it is empty or a previous `qlorakit quantize` output "
                             "(nothing else)")
    trust_remote_code: bool = option(False, "also copy the source's custom code (*.py files, config.json's "
                                     "auto_map); left out otherwise")


class DecodeOptions(CommandOptions):
    """What `generate` and `chat` share: the base, its adapter, the device and how replies are decoded."""

    model: str = _model()
    adapter: str | None = option(None, "a PEFT-format adapter folder (e.g. runs/quickstart/adapter)")
    force: bool = option(False, "load an adapter even if it was trained on another base")
    max_new_tokens: int = option(256, "the reply's length at most, in tokens", ge=1)
    temperature: float = option(0.0, "sampling temperature", ge=0, allow_inf_nan=False, note="0: greedy")
    top_p: float = option(1.0, "sample from the fewest most likely tokens whose probabilities add up to at least "
                          "this (nucleus sampling; 1: all tokens)", gt=0, le=1)
    repetition_penalty: float = option(
        1.0, "divide the positive logits (multiply the negative ones) of the tokens the reply already holds by P, "
        "as transformers' repetition penalty does (the prompt is not counted); 1.1 breaks the loops small models "
        "fall into when decoding greedily", gt=0, allow_inf_nan=False, metavar="P", note="1: off")
    device: str | None = _device()
    quantize: bool = option(True, "quantize the base to NF4 while loading",
                            off="run a 16-bit model folder (e.g. a merge) as stored, in 16/32 bits")


class GenerateOptions(DecodeOptions):
    """`qlorakit generate`: one reply per prompt."""

    prompt: list[str] = option(description="prompt text (repeatable)")
    chat_template: bool = option(True, "wrap the prompt in the tokenizer's chat template",
                                 off="feed the prompt as raw text")


class ChatOptions(DecodeOptions):
    """`qlorakit chat`: a conversation on the terminal."""

    system: str | None = option(None, "a system message")


class ServeOptions(CommandOptions):
    """`qlorakit serve`; infer/serve.py's serve_command reads these fields."""

    model: str = _model()
    adapter: list[str] | None = option(None, "serve the PEFT adapter in DIR under the model name NAME (repeatable)",
                                       metavar="NAME=DIR")
    host: str = option("127.0.0.1", "address to listen on; 127.0.0.1 is this machine only")
    port: int = option(8000, "port to listen on", ge=0, le=65535, note="0: any free port")
    force: bool = option(False, "serve adapters even if they were trained on another base")
    device: str | None = _device()
    max_batch: int = option(16, "requests decoded together at most (row slots of the running batch)", ge=1,
                            le=MAX_BATCH)
    batch_window_ms: float = option(5.0, "with nothing in progress, how long the first request waits for others "
                                    "to be prefilled with it, in milliseconds (later ones join at the next step)",
                                    ge=0, allow_inf_nan=False)


class PairsOptions(CommandOptions):
    """`qlorakit pairs`: preference pairs from an SFT data file (infer/pairs.py): the data's answer chosen, the
    model's sampled reply rejected."""

    model: str = _model()
    adapter: str | None = option(None, "a PEFT-format adapter folder to sample with (e.g. runs/quickstart/adapter)")
    force: bool = option(False, "load an adapter even if it was trained on another base")
    data: str = option("default:seed_tasks", "the SFT data: a .json/.jsonl/.parquet/.csv file or a bundled set "
                       "('default:seed_tasks')")
    format: Literal["alpaca", "chat"] = option("alpaca", "the SFT data's format: alpaca (instruction, input, "
                                               "output) or chat (messages)")
    messages_field: str = option("messages", "chat format: the field holding the messages")
    out: str = option(description="the pairs file to write (JSON lines, TRL's conversational format)")
    max_pairs: int = option(128, "pairs made at most (the data's first records)", ge=1)
    max_new_tokens: int = option(64, "a sampled reply's length at most, in tokens", ge=1)
    temperature: float = option(0.8, "sampling temperature of the rejected replies", gt=0, allow_inf_nan=False)
    top_p: float = option(0.95, "nucleus sampling of the rejected replies (1: all tokens)", gt=0, le=1)
    repetition_penalty: float = option(1.1, "as for `qlorakit generate`", gt=0, allow_inf_nan=False,
                                       note="1: off")
    batch_size: int = option(16, "prompts sampled together", ge=1, le=MAX_BATCH)
    seed: int = option(0, "seed of the sampling", ge=0)
    device: str | None = _device()
    quantize: bool = option(True, "quantize the base to NF4 while loading",
                            off="run a 16-bit model folder as stored, in 16/32 bits")


class InspectOptions(CommandOptions):
    """`qlorakit inspect MODEL_DIR`: how well NF4, FP4 and INT4 fit each quantizable linear weight
    (model/inspect_weights.py) and how far they move its output on calibration tokens (model/inspect_outputs.py)."""

    model_dir: str = option(description="a local Hugging Face causal-LM folder (config.json + *.safetensors), or "
                            "'default' (SmolLM2-135M-Instruct)", positional=True)
    json_path: str | None = option(None, "also write the full per-layer report to PATH as JSON", metavar="PATH")
    blocksize: Blocksize = option(64, "4-bit block size, a power of two in 32..4096")
    calibration_tokens: int = option(256, "also the relative output error ||XW^T - X deq(q(W))^T|| / ||XW^T|| of "
                                     "each linear on its real inputs X when the unquantized model runs in fp32 on "
                                     "the CPU over N tokens, as one sequence", ge=0, metavar="N", note="0: off")
    calibration_data: str | None = option(None, "the calibration tokens' source: a .json/.jsonl/.parquet/.csv file "
                                          "or a bundled set ('default:seed_tasks') (default: a built-in English "
                                          "text, about 1,150 tokens)", metavar="FILE")
    calibration_format: Literal["alpaca", "chat", "text"] = option(
        "alpaca", "--calibration-data's format: alpaca (instruction, input, output), chat (messages) or text")
    plot: str | None = option(None, "also draw the errors against the layer's position, outliers marked, into a "
                              "PNG file", metavar="PATH.png")
    progress: bool = option(True, "a progress bar over the layers", off="no progress bar")

    @model_validator(mode="after")
    def _data_needs_tokens(self) -> "InspectOptions":
        if self.calibration_data is not None and self.calibration_tokens == 0:
            raise ValueError(f"--calibration-data {self.calibration_data} with --calibration-tokens 0: no output "
                             "errors are computed; give a number of tokens or leave out the data")
        return self

# The data flags of `eval`, which --config replaces with its own data section.
EVAL_DATA_FLAGS = ("format", "template", "max_seq_length", "overlong", "text_field", "messages_field")
# The flags that shape lm-evaluation-harness runs, meaningless without --tasks.
EVAL_TASK_FLAGS = ("num_fewshot", "limit", "include_path", "apply_chat_template", "log_samples")


class EvalOptions(CommandOptions):
    """`qlorakit eval`: the loss over a data file's response tokens and lm-evaluation-harness tasks, for one model
    or several side by side (infer/evaluate.py). The data flags are the training config's `data.*` keys."""

    model: list[str] = option(description="a model to evaluate, one column of the table (repeatable): FOLDER as "
                              "--model takes it elsewhere, ':16bit' as stored or ':nf4'/':fp4' quantized while "
                              "loading (left out: as stored, or as +ADAPTER was trained), '+ADAPTER' a PEFT "
                              "adapter folder, 'NAME=' the column's name", metavar=SYNTAX)
    data: str | None = option(None, "loss and perplexity over the response tokens of every record of this data "
                              "file (.json/.jsonl/.parquet/.csv, or 'default:seed_tasks'), rendered and masked as "
                              "`qlorakit train` does", metavar="FILE")
    config: str | None = option(None, "loss and perplexity over the held-out examples of this training config "
                                "(data.eval_file, or the records data.eval_fraction holds out with training.seed), "
                                "rendered and masked as it trains", metavar="YAML")
    format: Literal["alpaca", "chat", "text"] = _data("format", "--data's format")
    template: Literal["auto", "chat_template", "alpaca"] = _data(
        "template", "--data's prompt template (auto: the tokenizer's chat template when it has one)")
    max_seq_length: int = option(TrainingSection.model_fields["max_seq_length"].default,
                                 "--data's longest example, in tokens", ge=16)
    overlong: Literal["drop", "truncate"] = _data("overlong", "an alpaca or chat example of --data longer than "
                                                  "--max-seq-length is dropped, or cut to it")
    text_field: str = _data("text_field", "--data's text field (format text)")
    messages_field: str = _data("messages_field", "--data's messages field (format chat)")
    tasks: str | None = option(None, "lm-evaluation-harness tasks or groups, comma-separated (e.g. arc_easy,"
                               "hellaswag, or local ones with --include-path); `lm-eval ls tasks` lists them",
                               metavar="TASK,...")
    num_fewshot: int | None = option(None, "few-shot examples per item (default: each task's own)", ge=0)
    limit: int | None = option(None, "items per task at most (default: all)", ge=1)
    include_path: str | None = option(None, "a folder of task YAML files to add to the harness's own",
                                      metavar="DIR")
    apply_chat_template: bool = option(False, "render the tasks' prompts through the tokenizer's chat template")
    bootstrap_iters: int = option(100000, "bootstrap resamples for the standard errors of metrics without a "
                                  "closed form (lm-evaluation-harness's default)", ge=0,
                                  note="0: no standard errors")
    log_samples: bool = option(False, "also write each task item's responses (log-likelihoods or generated text) "
                               "and scores into --json-path")
    batch_size: int = option(8, "rows per forward pass", ge=1)
    device: str | None = _device()
    force: bool = option(False, "load an adapter even if it was trained on another base")
    json_path: str | None = option(None, "also write every number to PATH as JSON (written atomically)",
                                   metavar="PATH")
    progress: bool = option(True, "progress bars", off="no progress bars")

    @model_validator(mode="after")
    def _combinations(self) -> "EvalOptions":
        parse_model_specs(self.model)
        if self.data and self.config:
            raise ValueError("--data and --config both name the data: give one (--config evaluates its held-out "
                             "examples, --data every record of a file)")
        if self.config:
            fields = type(self).model_fields
            changed = [f for f in EVAL_DATA_FLAGS if getattr(self, f) != fields[f].default]
            if changed:
                flag = "--" + changed[0].replace("_", "-")
                raise ValueError(f"{flag}: --config renders its data as its data section says; leave {flag} out, "
                                 "or give --data instead")
        if not self.tasks:
            fields = type(self).model_fields
            stray = [f for f in EVAL_TASK_FLAGS if getattr(self, f) != fields[f].default]
            if stray:
                raise ValueError(f"--{stray[0].replace('_', '-')} applies to --tasks, which is not given")
        if self.log_samples and not self.json_path:
            raise ValueError("--log-samples writes the items into --json-path, which is not given")
        return self

    def specs(self) -> list[ModelSpec]:
        """The --model values, parsed (options/model_spec.py)."""
        return parse_model_specs(self.model)
