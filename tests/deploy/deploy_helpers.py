"""Helpers for the deploy tests: PEFT adapters with random weights on a tiny base, logits, sharded copies."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INPUT_IDS = torch.tensor([[5, 17, 42, 99, 123, 7, 250, 3, 64, 11], [300, 2, 2, 18, 77, 140, 9, 31, 6, 200]])


def make_adapter(base_dir: Path, out_dir: Path, seed: int, targets: list[str] | None = None, r: int = 8,
                 alpha: float = 16.0, quantization: dict | None = None) -> Path:
    """A PEFT LoRA adapter of `base_dir` with random A and B (B scaled so the update is visible but moderate),
    fp32 tensors, and qlorakit's sidecar with the base fingerprint (and `quantization`, the base's quantization
    as a training run records it, when given)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlorakit.adapters.fingerprint import base_fingerprint

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ALL_LINEARS, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # PEFT draws lora_A from the global RNG: seed it, or the adapter depends on test order
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out_dir)
    record = {"base_fingerprint": base_fingerprint(base_dir), "base_model": str(base_dir)}
    if quantization is not None:
        record["quantization"] = quantization
    (out_dir / "qlorakit_adapter.json").write_text(json.dumps(record))
    return out_dir


def save_sharded_copy(src: Path, dst: Path) -> Path:
    """`src` saved again in ~50 KB shards with model.safetensors.index.json, plus its tokenizer files."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(dst, safe_serialization=True, max_shard_size="50KB")
    for path in src.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(path, dst / path.name)
    return dst


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=INPUT_IDS).logits.float()


def peft_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    """The reference: PEFT applying the adapter to the fp32 base (no merge)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return logits(PeftModel.from_pretrained(base, str(adapter_dir)))


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """`app` (an AdapterServer) served on 127.0.0.1 at a free port in a thread; yields the base URL."""
    import threading

    from qlorakit.infer.serve import make_server

    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def slow_decoding(monkeypatch, seconds: float = 0.02) -> None:
    """Make every shared decoding step of `qlorakit serve` take at least `seconds`, so tests of scheduling do not
    depend on machine speed."""
    import time

    from qlorakit.infer.slots import SlotDecoder

    real = SlotDecoder.step

    def slow(self, next_ids):
        logits = real(self, next_ids)
        time.sleep(seconds)
        return logits

    monkeypatch.setattr(SlotDecoder, "step", slow)
