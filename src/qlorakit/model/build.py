"""What every command builds a model from: the model folder a name stands for, its tokenizer, the device, the
compute dtype inference runs in, and the quantization the adapters were trained on (their qlorakit record), so
that `train`, `generate`, `chat` and `serve` resolve and build the base alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterMismatchError, DeviceError, QlorakitError

# qlorakit's defaults, the QLoRA paper's: what a base is quantized with when no adapter says otherwise.
DEFAULT_QUANTIZATION: dict[str, Any] = {"load_in_4bit": True, "quant_type": "nf4", "blocksize": 64,
                                        "double_quant": True}


def inference_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype inference runs in on `device`: bf16 on CUDA, fp32 elsewhere (CPUs without bf16 units
    are much faster in fp32)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def runtime_line(device: torch.device, dtype: torch.dtype) -> str:
    """What `generate`, `chat` and `serve` derive instead of taking it as an option, said once before loading:
    the device they resolved and the compute dtype it implies (inference_dtype)."""
    return (f"device {device}, compute dtype {str(dtype).removeprefix('torch.')} (derived from the device: "
            "bfloat16 on CUDA, float32 elsewhere)")


def trained_quantization(records: dict[str, dict[str, Any]], quant_type: str | None = None) -> dict[str, Any]:
    """load_model's quantization arguments for a base that serves the adapters whose qlorakit records are
    `records` (name -> record; {} for an adapter saved without one): each adapter's LoRA weights compensate the
    quantization of the base it was trained on, so the base is rebuilt that way. Adapters trained on different
    quantizations cannot share one base: AdapterMismatchError names them. `quant_type`, when given and no record
    says otherwise, replaces the default's."""
    quant = dict(DEFAULT_QUANTIZATION)
    if quant_type is not None:
        quant["quant_type"] = quant_type
    keys = ("quant_type", "blocksize", "double_quant")
    seen: dict[tuple, str] = {}
    for name, record in records.items():
        trained = (record or {}).get("quantization") or {}
        if not trained:
            continue
        mine = tuple(trained.get(k, quant[k]) for k in keys)
        if seen and mine not in seen:
            other, theirs = next(iter(seen.items()))
            raise AdapterMismatchError(
                f"adapters {theirs!r} and {name!r} were trained on differently quantized bases "
                f"({_words(other)} vs {_words(mine)}): one server holds one base; serve them separately")
        seen.setdefault(mine, name)
    if seen:
        quant.update(dict(zip(keys, next(iter(seen)))))
    return quant


def _words(q: tuple) -> str:
    quant_type, blocksize, double_quant = q
    return f"{quant_type}, blocksize {blocksize}, {'double' if double_quant else 'no double'} quantization"


def resolve_model_dir(name: str, revision: str | None = None) -> Path:
    """A local folder; 'default' (the bundled SmolLM2-135M-Instruct); or a hub id already in the local cache."""
    if name == "default":
        from ..assets import default_model_dir

        return default_model_dir()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise QlorakitError(f"model.name {name!r}: not a Hugging Face model folder (no config.json); a model "
                                "folder holds config.json, the *.safetensors weights and the tokenizer files")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, revision=revision, local_files_only=True))
        except Exception:
            raise QlorakitError(
                f"model.name {name!r}: not a local folder, and not in the local Hugging Face cache "
                "(qlorakit never downloads at run time; download it once with `huggingface-cli download`)"
            ) from None
    raise QlorakitError(f"model.name {name!r}: folder not found")


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        # transformers explains a folder without a usable tokenizer in several paragraphs; one line is enough.
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise QlorakitError(f"{model_dir}: cannot load its tokenizer ({first.rstrip(':')}); the folder needs the "
                            "tokenizer files next to config.json (tokenizer.json, or tokenizer.model with "
                            "sentencepiece installed)") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding positions are masked by position, never by token id
    return tok


def available_devices() -> list[str]:
    """What `--device` may name on this machine: cpu, then each accelerator that torch can use (cuda:0, ...)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for kind in ("mps", "xpu"):
        backend = getattr(torch.backends, kind, None) if kind == "mps" else getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            out.append(kind)
    return out


def resolve_device(device: str | None, option: str = "--device") -> torch.device:
    """`device` as a torch.device (None: CUDA when there is one, else the CPU). A name torch does not know, or a
    device this machine lacks (CUDA without a GPU, cuda:3 with two), is a DeviceError saying what is available,
    before anything is loaded."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"{option} {device!r} is not a device name; available here: {allowed}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise DeviceError(f"{option} {device}: not available, this machine has {have}; available here: "
                              f"{allowed}")
    elif dev.type != "cpu" and dev.type not in available_devices():
        raise DeviceError(f"{option} {device}: not available on this machine; available here: {allowed}")
    return dev
