"""`qlorakit generate` and `qlorakit chat`: the 4-bit base, optionally with a PEFT adapter, on one device."""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from ..errors import OptionValueError, QlorakitError
from ..options import ChatOptions, GenerateOptions

log = logging.getLogger("qlorakit.infer")

SAMPLING_OPTIONS = ("--max-new-tokens", "--temperature", "--top-p")


def check_sampling(max_new_tokens: object, temperature: object, top_p: object) -> None:
    """Refuse, with an OptionValueError naming the option, what decoding cannot do: max_new_tokens an integer >= 1,
    temperature a finite number >= 0 (0: greedy), top_p a number in (0, 1]. (serve's requests: requests.py.)"""
    names = SAMPLING_OPTIONS
    def number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise OptionValueError(f"{names[0]} {max_new_tokens!r}: allowed an integer >= 1")
    if not number(temperature) or not 0 <= temperature < float("inf"):
        raise OptionValueError(f"{names[1]} {temperature!r}: allowed a finite number >= 0 (0: greedy)")
    if not number(top_p) or not 0 < top_p <= 1:
        raise OptionValueError(f"{names[2]} {top_p!r}: allowed a number > 0 and <= 1")


def load_for_inference(model: str, adapter: str | None = None, *, force: bool = False, device: str | None = None,
                       quant_type: str = "nf4", compute_dtype: torch.dtype | None = None,
                       progress: bool = True, quantize: bool = True) -> tuple[nn.Module, object]:
    """(model with the adapter applied, tokenizer). The adapter must match the base unless force.

    quantize False runs a 16-bit folder as stored, in the compute dtype (e.g. to check a merge in 16 bits); a
    folder already in bitsandbytes' 4-bit format always loads its stored 4-bit weights (see loader.py)."""
    from ..adapters.fingerprint import base_fingerprint
    from ..adapters.peft_format import adapter_modules, check_adapter_fits, load_adapter, read_adapter
    from ..model.build import (inference_dtype, load_tokenizer, resolve_device, resolve_model_dir,
                               runtime_line, trained_quantization)
    from ..model.loader import load_model
    from ..model.lora_inject import inject_lora, keep_dense_copies_on_cpu

    model_dir = resolve_model_dir(model)
    dev = resolve_device(device)
    dtype = compute_dtype or inference_dtype(dev)
    if compute_dtype is None:
        log.info("qlorakit: %s", runtime_line(dev, dtype))
    tokenizer = load_tokenizer(model_dir)
    records = {}
    if adapter:
        config, tensors, record = read_adapter(adapter)  # checked here, before the base is loaded
        records[str(adapter)] = record
    # Rebuild the base the way the adapter was trained on it: its LoRA weights compensate that quantization.
    quant = trained_quantization(records, quant_type)
    if not quantize:
        quant["load_in_4bit"] = False
    if adapter:
        from ..adapters.loftq import check_base_kind

        check_base_kind(records[str(adapter)], quant["load_in_4bit"], adapter)
    net, report = load_model(model_dir, **quant, compute_dtype=dtype, device=dev, progress=progress)
    log.info("qlorakit: %s", report.line())
    if adapter:
        modules = adapter_modules(tensors)
        check_adapter_fits(adapter, config, modules, net)
        inject_lora(net, list(modules), r=config["r"], alpha=float(config["lora_alpha"]),
                    dropout=0.0, use_rslora=bool(config.get("use_rslora", False)), adapter_dtype=dtype)
        load_adapter(net, adapter, base_fingerprint=base_fingerprint(model_dir), force=force)
        log.info("qlorakit: adapter %s applied", adapter)
    if dev.type == "cpu":
        keep_dense_copies_on_cpu(net, dtype)
    net.eval()
    return net, tokenizer


def generate_command(opts: GenerateOptions) -> int:
    """`qlorakit generate`: each prompt's reply streamed to stdout (the options were checked when built)."""
    from .generate import generate

    net, tok = load_for_inference(opts.model, opts.adapter, force=opts.force, device=opts.device,
                                  quantize=opts.quantize)
    for prompt in opts.prompt:
        if len(opts.prompt) > 1:
            print(f">>> {prompt}")
        generate(net, tok, prompt, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                 top_p=opts.top_p, repetition_penalty=opts.repetition_penalty,
                 use_chat_template=opts.chat_template, stream=sys.stdout)
        print()
    return 0


def chat_command(opts: ChatOptions) -> int:
    """`qlorakit chat`: read a message, stream the reply, keep the history, until /exit or end of input."""
    from .generate import generate

    net, tok = load_for_inference(opts.model, opts.adapter, force=opts.force, device=opts.device,
                                  quantize=opts.quantize)
    if not getattr(tok, "chat_template", None):
        raise QlorakitError(f"{opts.model}: the tokenizer has no chat template; use `qlorakit generate` instead")
    history: list[dict[str, str]] = [{"role": "system", "content": opts.system}] if opts.system else []
    print("chat: type a message, /reset to clear the history, /exit to leave", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if opts.system else []
            continue
        print("model> ", end="", flush=True)
        reply = generate(net, tok, line, history=history, max_new_tokens=opts.max_new_tokens,
                         temperature=opts.temperature, top_p=opts.top_p,
                         repetition_penalty=opts.repetition_penalty, stream=sys.stdout)
        print()
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
