"""`qlorakit ...`: thin commands over the library. Errors a user can cause print one line, no traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import OptionValueError, QlorakitError
from .options import (ChatOptions, CommandOptions, EvalOptions, GenerateOptions, InspectOptions, PairsOptions,
                      QuantizeOptions, ServeOptions, add_flags, read_flags)


def _cmd_quantize(opts: QuantizeOptions) -> int:
    from .model.quantize_checkpoint import quantize_checkpoint

    quantize_checkpoint(**opts.model_dump())
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .adapters.merge import merge_adapter

    report = merge_adapter(args.model, args.adapter, args.out, overwrite=args.overwrite, force=args.force,
                           quantize=args.quantize, requantize=args.requantize, gguf=args.gguf,
                           progress=not args.no_progress, trust_remote_code=args.trust_remote_code)
    print(report.line())
    return 0


def _cmd_serve(opts: ServeOptions) -> int:
    from .infer.serve import serve_command
    from .model.build import inference_dtype, resolve_device, runtime_line

    device = resolve_device(opts.device)
    logging.getLogger("qlorakit.cli").info("qlorakit: %s", runtime_line(device, inference_dtype(device)))
    return serve_command(opts)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .assets import prepare_all

    paths = prepare_all()
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .infer.decode import check_repetition_penalty
    from .train.pipeline import train_command
    from .train.runtime import prefer_expandable_segments

    prefer_expandable_segments()

    if args.max_new_tokens < 1:
        raise OptionValueError(f"--max-new-tokens {args.max_new_tokens}: allowed an integer >= 1")
    check_repetition_penalty(args.repetition_penalty)
    cfg = load_config(args.config, args.set or [])
    return train_command(cfg, prompts=args.prompt or [], max_new_tokens=args.max_new_tokens,
                         repetition_penalty=args.repetition_penalty, progress=not args.no_progress)


def _cmd_estimate(args: argparse.Namespace) -> int:
    import json
    import math

    from .config import load_config
    from .memory import estimate, suggest
    from .model.build import resolve_model_dir

    budget = args.memory_budget
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise OptionValueError(f"--memory-budget {budget:g}: allowed a finite number of GiB > 0")
    cfg = load_config(args.config, args.set or [])
    model_dir = resolve_model_dir(cfg.model.name, cfg.model.revision)
    fit = suggest(cfg, model_dir, budget) if budget is not None else None
    est = fit.estimate if fit is not None else estimate(cfg, model_dir)
    if args.json:
        record = est.to_json()
        if fit is not None:
            record["budget"] = fit.to_json()
        print(json.dumps(record, indent=1))
    else:
        print(est.table())
        if fit is not None:
            print("\n" + "\n".join(fit.lines()))
    return 0


def _cmd_generate(opts: GenerateOptions) -> int:
    from .infer.session import generate_command

    return generate_command(opts)


def _cmd_chat(opts: ChatOptions) -> int:
    from .infer.session import chat_command

    return chat_command(opts)


def _cmd_pairs(opts: PairsOptions) -> int:
    from .infer.pairs import pairs_command

    return pairs_command(opts)


def _cmd_inspect(opts: InspectOptions) -> int:
    import json
    from pathlib import Path

    from .atomic import write_text
    from .model.build import resolve_model_dir
    from .model.inspect_plot import check_png_path, plot_report
    from .model.inspect_weights import inspect_model

    if opts.plot:
        check_png_path(opts.plot)
    folder = resolve_model_dir("default") if opts.model_dir == "default" else opts.model_dir

    def calibration():  # called by inspect_model once the folder is known to be a model
        from .data.calibration import calibration_tokens
        from .model.build import load_tokenizer

        return calibration_tokens(load_tokenizer(Path(folder)), opts.calibration_tokens, opts.calibration_data,
                                  opts.calibration_format)

    report = inspect_model(folder, opts.blocksize, opts.progress, calibration if opts.calibration_tokens else None)
    print(report.table())
    if opts.json_path:
        write_text(opts.json_path, json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {opts.json_path}")
    if opts.plot:
        print(f"wrote {plot_report(report, opts.plot)}")
    return 0


def _cmd_eval(opts: EvalOptions) -> int:
    from .infer.evaluate import eval_command

    return eval_command(opts)


def _with_options(parser: argparse.ArgumentParser, options: type[CommandOptions],
                  func: Callable[..., int]) -> None:
    """The flags of `parser` are the fields of `options`; main reads them back into it and calls func with it."""
    add_flags(parser, options)
    parser.set_defaults(func=func, options=options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlorakit",
        description="QLoRA fine-tuning: NF4 + double quantization, 4-bit LoRA layers, paged optimizers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser(
        "quantize",
        help="write a pre-quantized (bitsandbytes-format) 4-bit checkpoint of a Hugging Face causal LM folder",
        description="Quantize the linear layers of the transformer blocks to 4 bits and write a checkpoint that "
        "transformers + bitsandbytes load with from_pretrained. Embeddings, norms and the head keep their dtype.",
    )
    _with_options(q, QuantizeOptions, _cmd_quantize)

    t = sub.add_parser("train", help="fine-tune with QLoRA from a YAML config",
                       description="Fine-tune a 4-bit base model with LoRA. Resumes from the newest checkpoint in "
                       "training.output_dir when there is one.")
    t.add_argument("config", nargs="?", help="YAML config (sections: model, quantization, lora, training, data); "
                   "omitted: all defaults")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set training.learning_rate=1e-4 (repeatable)")
    t.add_argument("--prompt", action="append", metavar="TEXT",
                   help="print the model's reply to this prompt before and after training (repeatable)")
    t.add_argument("--max-new-tokens", type=int, default=96, help="length of the --prompt replies")
    t.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P",
                   help="repetition penalty of the --prompt replies, before and after training alike (as for "
                   "`qlorakit generate`; 1 = off, greedy)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser(
        "estimate", help="estimate the peak GPU memory of a training config from config.json alone",
        description="Peak GPU memory (torch's count and the device's, as NVML shows it) and host memory that "
        "`qlorakit train CONFIG` needs, by component, beside 16-bit LoRA and full fine-tuning of the same model. "
        "Reads the model's config.json only: no weights, no GPU. The memory model: src/qlorakit/memory/estimate.py.")
    e.add_argument("config", nargs="?", help="the YAML config `qlorakit train` reads; omitted: all defaults")
    e.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a config value, as for `qlorakit train` (repeatable)")
    e.add_argument("--memory-budget", type=float, metavar="GiB",
                   help="the GPU memory to fit in: says whether the config fits and, if not, which changes would")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    e.set_defaults(func=_cmd_estimate)

    g = sub.add_parser("generate", help="generate a reply on the 4-bit base (+ adapter)")
    _with_options(g, GenerateOptions, _cmd_generate)

    c = sub.add_parser("chat", help="chat on the 4-bit base (+ adapter), streaming tokens; /exit to leave")
    _with_options(c, ChatOptions, _cmd_chat)

    m = sub.add_parser(
        "merge", help="fold a LoRA adapter into its 16-bit base and write a standalone model folder",
        description="Add scaling * B @ A (computed in fp32, rounded once to the stored dtype) to every adapted "
        "weight, tensor by tensor, so peak host memory stays below the largest shard. Config, tokenizer and "
        "generation config are copied; the output is written atomically.",
    )
    m.add_argument("--model", required=True, help="the base: a local Hugging Face folder (config.json + *.safetensors)")
    m.add_argument("--adapter", required=True, help="a PEFT-format LoRA adapter folder (e.g. runs/quickstart/adapter)")
    m.add_argument("--out", required=True, help="the merged model folder (must not exist unless --overwrite)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is empty or a previous `qlorakit merge` output (nothing else)")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="also copy the base's custom code (*.py files, config.json's auto_map); left out otherwise")
    m.add_argument("--force", action="store_true", help="merge even if the adapter was trained on another base")
    m.add_argument("--quantize", choices=("nf4",),
                   help="write the merged model as a bitsandbytes 4-bit checkpoint (as `qlorakit quantize` does)")
    m.add_argument("--requantize", action="store_true",
                   help="allow a 4-bit base: dequantize, merge, re-quantize, and report the added error "
                   "(merging into the 16-bit base is better)")
    m.add_argument("--gguf", choices=("f16", "bf16", "q8_0"),
                   help="also write model-<type>.gguf (with the tokenizer) into --out, for llama.cpp and friends; "
                   "Llama, Mistral and Qwen2 models with byte-level BPE tokenizers")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=_cmd_merge)

    s = sub.add_parser(
        "serve", help="serve the 4-bit base and LoRA adapters over an OpenAI-compatible HTTP API",
        description="POST /v1/completions and /v1/chat/completions, GET /v1/models. The request's `model` picks an "
        "adapter by NAME, or the base by its --model value. The base is loaded once with every adapter held at "
        "once; requests that arrive together (within --batch-window-ms, up to --max-batch) are decoded in one "
        "batch, each row with its own adapter, and later ones join it every 16 tokens. Greedy unless `temperature` "
        "> 0; `stream: true` sends server-sent events. Requests beyond the model's context or 1 MiB are refused "
        "with a 4xx; SIGTERM finishes the requests in flight.",
    )
    _with_options(s, ServeOptions, _cmd_serve)

    p = sub.add_parser(
        "pairs", help="make preference pairs from SFT data: its answers chosen, the model's sampled replies rejected",
        description="For the first --max-pairs records of --data, sample the model's (+ adapter's) reply to each "
        "prompt and write {prompt, chosen, rejected} in TRL's conversational format to --out (the SPIN recipe), "
        "for training.objective dpo: see examples/dpo.yaml.")
    _with_options(p, PairsOptions, _cmd_pairs)

    i = sub.add_parser(
        "inspect", help="per linear layer: weight statistics and the NF4 / FP4 / INT4 weight and output errors",
        description="For every linear weight qlorakit quantizes, read one at a time: std, excess kurtosis, the "
        "distance of its absmax-normalised blocks from the normal quantiles NF4 assumes, and the relative error "
        "||W - deq(q(W))|| / ||W|| of NF4, FP4 and absmax INT4; then (--calibration-tokens, 256 by default) the "
        "relative error of each linear's output on its real inputs when the unquantized model runs over that many "
        "tokens. Prints the 10 worst layers by NF4 (output) error and parameter-weighted totals; flags layers whose "
        "NF4 error is above median + 3 MAD, and layers where FP4 or INT4 beats NF4, by weight and by output error. "
        "--plot draws them against the layer's position. Definitions: src/qlorakit/model/inspect_weights.py and "
        "inspect_outputs.py.")
    _with_options(i, InspectOptions, _cmd_inspect)

    v = sub.add_parser(
        "eval", help="loss on a data file and lm-evaluation-harness tasks, several models side by side",
        description="Evaluate one or more models, each a base (16-bit, NF4/FP4 while loading, or a 4-bit folder) "
        "with or without a LoRA adapter, or a merged folder: the mean loss and perplexity over the response tokens "
        "of --data (or of --config's held-out examples), rendered and masked as `qlorakit train` does, and "
        "lm-evaluation-harness --tasks through the harness's own Python API. Prints one table (a column per model, "
        "its precision in the header, a row per metric); --json-path writes every number. Example: qlorakit eval "
        "--model base=default --model nf4=default:nf4 --model tuned=default+runs/quickstart/adapter --config "
        "examples/quickstart.yaml --tasks qlorakit_basics --include-path examples/eval")
    _with_options(v, EvalOptions, _cmd_eval)

    d = sub.add_parser("demo", help="prepare the bundled default model and data in the user cache (idempotent)")
    d.set_defaults(func=_cmd_demo)
    return parser


def os_error_line(err: OSError) -> str:
    """`<file>: <strerror>` of an OSError (both files of a rename or copy), or its text when it names no file."""
    what = err.strerror or (str(err).splitlines() or [type(err).__name__])[0]
    files = [str(f) for f in (err.filename, err.filename2) if f is not None]
    return f"{' -> '.join(files)}: {what}" if files else what


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        options = getattr(args, "options", None)
        return int(args.func(read_flags(options, args) if options else args) or 0)
    except QlorakitError as err:
        if args.verbose:
            raise
        print(f"qlorakit: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # permission denied, disk full, a folder where a file should be, ...: the system's words
        if args.verbose:
            raise
        print(f"qlorakit: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
