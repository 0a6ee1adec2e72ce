"""`qlorakit generate` and `qlorakit chat`: the 4-bit base, optionally with a PEFT adapter, on one device."""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from torch import nn

from ..errors import QlorakitError

log = logging.getLogger("qlorakit.infer")


def load_for_inference(model: str, adapter: str | None = None, *, force: bool = False, device: str | None = None,
                       quant_type: str = "nf4", compute_dtype: torch.dtype | None = None,
                       progress: bool = True) -> tuple[nn.Module, object]:
    """(model with the adapter applied, tokenizer). The adapter must match the base unless force."""
    from ..adapters.fingerprint import base_fingerprint
    from ..adapters.peft_format import load_adapter, read_adapter
    from ..model.loader import load_model
    from ..model.lora_inject import inject_lora, keep_dense_copies_on_cpu
    from ..train.run import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(model)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = compute_dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tokenizer = load_tokenizer(model_dir)
    quant = {"load_in_4bit": True, "quant_type": quant_type, "blocksize": 64, "double_quant": True}
    if adapter:
        config, _, record = read_adapter(adapter)
        # Rebuild the base the way the adapter was trained on it: its LoRA weights compensate that quantization.
        trained = record.get("quantization") or {}
        quant.update({k: trained[k] for k in quant if k in trained})
    net, report = load_model(model_dir, **quant, compute_dtype=dtype, device=dev, progress=progress)
    log.info("qlorakit: %s", report.line())
    if adapter:
        targets = config.get("target_modules") or "all-linear"
        inject_lora(net, targets, r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=0.0,
                    use_rslora=bool(config.get("use_rslora", False)), adapter_dtype=dtype)
        load_adapter(net, adapter, base_fingerprint=base_fingerprint(model_dir), force=force)
        log.info("qlorakit: adapter %s applied", adapter)
    if dev.type == "cpu":
        keep_dense_copies_on_cpu(net, dtype)
    net.eval()
    return net, tokenizer


def generate_command(args: argparse.Namespace) -> int:
    from .generate import generate

    net, tok = load_for_inference(args.model, args.adapter, force=args.force, device=args.device)
    for prompt in args.prompt:
        if len(args.prompt) > 1:
            print(f">>> {prompt}")
        generate(net, tok, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_p=args.top_p, use_chat_template=not args.no_chat_template, stream=sys.stdout)
        print()
    return 0


def chat_command(args: argparse.Namespace) -> int:
    from .generate import generate

    net, tok = load_for_inference(args.model, args.adapter, force=args.force, device=args.device)
    if not getattr(tok, "chat_template", None):
        raise QlorakitError(f"{args.model}: the tokenizer has no chat template; use `qlorakit generate` instead")
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
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
            history = history[:1] if args.system else []
            continue
        print("model> ", end="", flush=True)
        reply = generate(net, tok, line, history=history, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, stream=sys.stdout)
        print()
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
