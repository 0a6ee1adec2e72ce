"""`qlorakit eval`'s models: every `--model` spec checked before any model loads (its folder, its adapter and the
adapter's base fingerprint, the precision asked for), then loaded as `qlorakit generate` loads a model, and its
precision read back from the loaded layers for the table's header."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterMismatchError, OptionValueError, QlorakitError
from ..options.model_spec import ModelSpec

log = logging.getLogger("qlorakit.infer")


@dataclass
class EvalModel:
    """One --model, checked: its folder, whether the folder stores 4-bit weights, the adapter's qlorakit record,
    and how load_for_inference is to build it (quantize, quant_type)."""

    spec: ModelSpec
    model_dir: Path
    stored_4bit: bool
    quantize: bool
    quant_type: str
    adapter_record: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def load(self, device: torch.device, dtype: torch.dtype, force: bool, progress: bool) -> tuple[nn.Module, Any]:
        """(model in eval mode, tokenizer), as `qlorakit generate` loads them."""
        from .session import load_for_inference

        return load_for_inference(str(self.model_dir), self.spec.adapter, force=force, device=str(device),
                                  quant_type=self.quant_type, compute_dtype=dtype, progress=progress,
                                  quantize=self.quantize)

    def stored_dtype(self) -> str:
        """The weights' dtype as config.json records it ('bfloat16', ...; '?' when it does not say)."""
        try:
            config = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "?"
        return str(config.get("dtype") or config.get("torch_dtype") or "?")


def precision_words(net: nn.Module, stored_4bit: bool, stored_dtype: str) -> str:
    """What the loaded model computes with, from its layers: 'nf4 b64 dq' (quantized while loading), 'nf4 b64 dq
    stored' (read from a 4-bit folder), or the stored 16-bit dtype ('bfloat16') when no linear is 4-bit."""
    from ..nn.linear4bit import Linear4bit

    kinds = sorted({(m.quant_type, m.blocksize, m.double_quant) for m in net.modules() if isinstance(m, Linear4bit)})
    if not kinds:
        return stored_dtype
    words = ", ".join(f"{qt} b{bs}{' dq' if dq else ''}" for qt, bs, dq in kinds)
    return words + (" stored" if stored_4bit else "")


def _model_dir(spec: ModelSpec) -> Path:
    from ..model.build import resolve_model_dir

    path = Path(spec.folder).expanduser()
    hub_id = spec.folder.count("/") == 1 and not spec.folder.startswith((".", "/", "~"))
    if spec.folder != "default" and not path.exists() and not hub_id:
        raise QlorakitError(f"--model {spec.text!r}: folder {spec.folder} not found")
    try:
        return resolve_model_dir(spec.folder)
    except QlorakitError as err:
        raise QlorakitError(f"--model {spec.text!r}: {err}") from None


def _check_fingerprint(spec: ModelSpec, model_dir: Path, record: dict[str, Any], force: bool) -> None:
    from ..adapters.fingerprint import base_fingerprint

    saved = record.get("base_fingerprint")
    if not saved or force:
        return
    mine = base_fingerprint(model_dir)
    if saved != mine:
        raise AdapterMismatchError(
            f"--model {spec.text!r}: adapter {spec.adapter} was trained on another base model (fingerprint "
            f"{saved[:12]}, base {record.get('base_model', '?')}), {spec.folder} is {mine[:12]}; use --force to "
            "evaluate it anyway")


def resolve_model(spec: ModelSpec, force: bool = False) -> EvalModel:
    """Check one spec without loading weights: the folder (config.json, weight files), the adapter (readable, made
    for this base unless force) and the precision; decide how it loads. QlorakitError in one line otherwise."""
    from ..adapters.peft_format import read_adapter
    from ..model.checkpoint_files import find_checkpoint_files
    from ..model.loader import stored_4bit_weights

    model_dir = _model_dir(spec)
    stored = bool(stored_4bit_weights(model_dir, find_checkpoint_files(model_dir)))
    record: dict[str, Any] = {}
    if spec.adapter:
        _, _, record = read_adapter(spec.adapter)
        _check_fingerprint(spec, model_dir, record, force)
    trained = record.get("quantization") or {}
    trained_4bit = bool(trained) and bool(trained.get("load_in_4bit", True))
    if stored:
        if spec.precision == "16bit":
            raise OptionValueError(f"--model {spec.text!r}: {spec.folder} stores 4-bit weights, which load only in 4 "
                                   "bits; ':16bit' needs a 16-bit folder (leave the precision out)")
        return EvalModel(spec, model_dir, True, True, spec.precision or "nf4", record)
    if spec.precision in ("nf4", "fp4") and trained_4bit and trained.get("quant_type", "nf4") != spec.precision:
        raise OptionValueError(f"--model {spec.text!r}: adapter {spec.adapter} was trained on a "
                               f"{trained.get('quant_type', 'nf4')} base, the spec asks for {spec.precision}; leave "
                               "the precision out to rebuild the base the adapter was trained on")
    if spec.precision == "16bit" or (spec.precision is None and not trained_4bit):
        return EvalModel(spec, model_dir, False, False, "nf4", record)
    return EvalModel(spec, model_dir, False, True, spec.precision or trained.get("quant_type", "nf4"), record)
