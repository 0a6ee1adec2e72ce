"""`qlorakit merge`: fold a PEFT LoRA adapter into its base checkpoint, one safetensors shard at a time.

For every adapted linear `<path>`, the stored weight W (dtype d, [out_features, in_features]) becomes
`d(fp32(W) + scaling * fp32(B) @ fp32(A))`, rounded once. PEFT keys `base_model.model.<path>.lora_A.weight`
map to the base tensor `<path>.weight`. Every other tensor is copied as stored.

Memory: the adapter (small) plus one source tensor with its fp32 copy and update; output tensors are spooled to
disk by SafetensorsWriter. Peak host memory stays below the largest shard (benchmarks/merge_memory.py), far
below the model.

A 4-bit (bitsandbytes-format) base is refused: adding a small update to NF4 codes re-rounds the whole weight,
so the adapter's effect is largely lost in quantization noise. `requantize=True` does it anyway (dequantize,
merge, quantize again with the same settings) and reports the relative Frobenius error that re-quantization
adds. `quantize="nf4"` writes the merged model as a bitsandbytes 4-bit checkpoint, as `qlorakit quantize` does.

A lora.init loftq adapter (its record says so, peft_format.quantized_base_update) was fitted to the dequantized
4-bit base: its B @ A starts near the quantization error W - deq, so adding it to W would count that error twice.
Such an adapter is merged into the base it was trained on: W becomes `d(deq + scaling * B @ A)`, with deq =
dequantize(quantize(W)) in fp32, quantized as the record's `quantization` says (the same bytes the training run's
loader made), so the merged model is the trained one within one rounding to d (bf16: relative 2^-8 per weight).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .. import kernels
from ..errors import AdapterMismatchError, CheckpointFormatError, QlorakitError
from ..model.checkpoint_files import INDEX_FILE, find_checkpoint_files, require_model_folder
from ..model.output_folder import check_out_dir, commit, copy_side_files, drop_auto_map, new_partial, say_left_out
from ..model.quantize_checkpoint import converted, read_config_json, write_json
from ..model.safetensors_writer import SafetensorsWriter
from ..nn.lora import lora_scaling
from ..quant.bnb_format import (
    QUANT_STATE_KEY,
    WEIGHT_STATE_MARK,
    quant_state_blob,
    quant_state_from_tensors,
    quant_state_to_tensors,
    quantization_config,
)
from .export_gguf import GGUF_TYPES, check_exportable, export_gguf
from .fingerprint import base_fingerprint
from .peft_format import adapter_modules, quantized_base_update, read_adapter

log = logging.getLogger("qlorakit.adapters")

QUANTIZE_CHOICES = ("nf4",)
_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


@dataclass
class LoraDelta:
    """One adapted linear: lora_A [r, in_features], lora_B [out_features, r] (adapter dtype, CPU)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def weight(self) -> torch.Tensor:
        """scaling * B @ A, fp32 [out_features, in_features]."""
        return (self.b.float() @ self.a.float()) * self.scaling

    @property
    def shape(self) -> list[int]:
        return [int(self.b.shape[0]), int(self.a.shape[1])]


@dataclass
class MergeReport:
    out_dir: Path
    merged_linears: int = 0
    tensors: int = 0
    largest_shard_bytes: int = 0
    quantized: str | None = None
    gguf_file: Path | None = None
    requantize_errors: dict[str, float] = field(default_factory=dict)  # module -> relative Frobenius error

    def line(self) -> str:
        text = f"merged {self.merged_linears} linears into {self.out_dir} ({self.tensors} tensors"
        if self.quantized:
            text += f", written as {self.quantized}"
        text += ")"
        if self.gguf_file is not None:
            text += f"; GGUF: {self.gguf_file}"
        if self.requantize_errors:
            errs = list(self.requantize_errors.values())
            text += (f"; re-quantization added a relative Frobenius error of {sum(errs) / len(errs):.4f} on "
                     f"average, {max(errs):.4f} at most")
        return text


def lora_deltas(adapter_dir: str | Path) -> tuple[dict[str, LoraDelta], dict]:
    """(weight key '<path>.weight' -> LoraDelta, the adapter's qlorakit record) of a PEFT LoRA adapter folder,
    checked by read_adapter (config keys, A/B pairs, shapes against r) before anything of the base is read."""
    config, tensors, record = read_adapter(adapter_dir)
    scaling = lora_scaling(config["r"], float(config["lora_alpha"]), bool(config.get("use_rslora")))
    deltas = {module + ".weight": LoraDelta(a, b, scaling) for module, (a, b) in adapter_modules(tensors).items()}
    return deltas, record


def merge_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    force: bool = False,
    quantize: str | None = None,
    requantize: bool = False,
    gguf: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> MergeReport:
    """Write base + adapter merged to `out_dir` (atomically: a temporary sibling folder, renamed when complete).

    The output keeps the source's file layout (model.safetensors, or the same shards with a rewritten
    model.safetensors.index.json), config.json and the other top-level files (tokenizer, generation config); the
    base's custom code (*.py, `auto_map`) only with `trust_remote_code`. An existing `out_dir` is replaced only
    with `overwrite`, and only when it is empty or a previous `qlorakit merge` output (see output_folder.py).
    `gguf` (f16, bf16 or q8_0) also writes the merged model as `model-<type>.gguf` into the folder (see
    export_gguf.py). Raises AdapterMismatchError when the adapter records another base (unless force),
    CheckpointFormatError / QlorakitError with one line for missing files, shape mismatches, a 4-bit base
    without `requantize`.
    """
    src = require_model_folder(model_dir)
    if not Path(adapter_dir).is_dir():
        raise CheckpointFormatError(f"{adapter_dir}: adapter folder not found")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise QlorakitError(f"quantize={quantize!r} is not allowed; use one of {', '.join(QUANTIZE_CHOICES)}")
    if gguf is not None and gguf not in GGUF_TYPES:
        raise QlorakitError(f"gguf={gguf!r} is not allowed; use one of {', '.join(GGUF_TYPES)}")
    if gguf is not None and (quantize or requantize):
        raise QlorakitError("GGUF export is from the 16-bit merge; leave out --quantize/--requantize with --gguf")
    if gguf is not None:
        check_exportable(src)  # fail before merging, not after
    out = Path(out_dir)
    inputs = {"base model": src, "adapter": Path(adapter_dir)}
    check_out_dir(out, "merge", overwrite, inputs)
    deltas, record = lora_deltas(adapter_dir)
    saved_fp = record.get("base_fingerprint")
    if saved_fp and not force:
        fp = base_fingerprint(src)
        if fp != saved_fp:
            raise AdapterMismatchError(
                f"{adapter_dir}: adapter was trained on another base model (fingerprint {saved_fp[:12]}, base "
                f"{record.get('base_model', '?')}), {src} is {fp[:12]}; use --force to merge it anyway")

    config = _read_raw_config(src)
    checkpoint = find_checkpoint_files(src)
    where = checkpoint.key_to_file()
    four_bit = sorted(k.split(WEIGHT_STATE_MARK)[0] + ".weight" for k in where if WEIGHT_STATE_MARK in k)
    if four_bit and not requantize:
        raise QlorakitError(
            f"{src}: is a 4-bit (bitsandbytes) checkpoint; merging into NF4 weights re-rounds every weight and "
            "loses most of the adapter in quantization noise. Merge into the 16-bit base instead, or pass "
            "--requantize to dequantize, merge and re-quantize (the added error is reported)")
    if four_bit and quantize:
        raise QlorakitError(f"{src}: is already a 4-bit checkpoint; --quantize is for a 16-bit base "
                            "(--requantize keeps the base's 4-bit format)")
    _check_targets(src, checkpoint, where, deltas, set(four_bit))
    trained_base = _trained_quantization(adapter_dir, record) if quantized_base_update(record) else None
    targets = {}
    if quantize:
        from ..model.targets import target_linears_of

        targets = target_linears_of(src)
        config = read_config_json(src)  # refuses a config that already has a quantization_config

    report = MergeReport(out, quantized=quantize)
    partial = new_partial(out)
    try:
        weight_map, total_size = {}, 0
        with tqdm(total=checkpoint.num_tensors(), desc="merge", unit="tensor", file=sys.stderr,
                  disable=not progress) as bar:
            for path, names in checkpoint.keys.items():
                report.largest_shard_bytes = max(report.largest_shard_bytes, path.stat().st_size)
                writer = SafetensorsWriter(partial / path.name, metadata={"format": "pt"})
                with writer:
                    for key, value in _merged_shard(path, names, deltas, set(four_bit), targets, quantize, report,
                                                    bar.update, trained_base):
                        writer.add(key, value)
                        weight_map[key] = path.name
                        report.tensors += 1
                total_size += writer.nbytes
        if checkpoint.sharded:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(partial / INDEX_FILE, index)
        if quantize:
            config["quantization_config"] = quantization_config(quantize, True, torch.bfloat16)
        left_out = drop_auto_map(config, trust_remote_code)
        write_json(partial / "config.json", config)
        left_out += copy_side_files(src, partial, trust_remote_code)
        if gguf is not None:
            report.gguf_file = out / export_gguf(partial, partial / f"model-{gguf}.gguf", gguf, progress).name
        commit(partial, out, "merge", overwrite, inputs)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    say_left_out(out, left_out)
    log.info("qlorakit: %s", report.line())
    return report


def _merged_shard(path: Path, names: list[str], deltas: dict[str, LoraDelta], four_bit: set[str], targets: dict,
                  quantize: str | None, report: MergeReport, done: Callable[[int], object],
                  trained_base: dict | None = None):
    """Yield the output (name, tensor) entries of source shard `path`, one source tensor at a time. With
    `trained_base` (a loftq adapter's quantization: quant_type, blocksize, double_quant) an adapted 16-bit weight
    is replaced by its dequantized 4-bit version before the update is added.

    Each tensor is read through its own short-lived memory map: pages of one long-open map stay in the resident
    set until it closes, which would make peak memory the whole shard rather than one tensor.
    """
    constants = {w + s for w in four_bit for s in _STATE_SUFFIXES}
    for name in names:
        done(1)
        if WEIGHT_STATE_MARK in name or name in constants:
            continue  # a 4-bit weight's constants: written with its weight below
        if name in four_bit:
            with safe_open(str(path), framework="pt") as f:
                entries = _requantized(f, name, deltas.get(name), report)
        else:
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(name)
            delta = deltas.get(name)
            if delta is not None:
                base = tensor.float() if trained_base is None else _dequantized(tensor, trained_base)
                tensor = (base + delta.weight()).to(tensor.dtype)
                report.merged_linears += 1
            entries = converted(name, tensor, targets, 64, quantize, True) if quantize else [(name, tensor)]
        yield from entries



def _requantized(f, name: str, delta: LoraDelta | None, report: MergeReport) -> list[tuple[str, torch.Tensor]]:
    """The bitsandbytes entries of 4-bit weight `name` after dequantize, merge, quantize with its own settings."""
    prefix = name.removesuffix("weight")
    have = set(f.keys())
    tensors = {k: f.get_tensor(k) for k in have if k == name or k.startswith(name + ".")}
    packed, state = quant_state_from_tensors(prefix, tensors, where=name)
    if delta is None:
        return list(tensors.items())
    exact = kernels.call("dequantize_4bit", packed, state, torch.float32) + delta.weight()
    new_packed, new_state = kernels.call("quantize_4bit", exact.to(state.dtype), state.blocksize, state.quant_type,
                                         state.nested is not None)
    back = kernels.call("dequantize_4bit", new_packed, new_state, torch.float32)
    report.requantize_errors[prefix.rstrip(".")] = float((back - exact).norm() / exact.norm().clamp_min(1e-30))
    report.merged_linears += 1
    return list(quant_state_to_tensors(prefix, new_packed, new_state).items())


def _trained_quantization(adapter_dir: str | Path, record: dict) -> dict:
    """The 4-bit settings a loftq adapter was trained with (its record's `quantization`), checked."""
    q = record.get("quantization") or {}
    if not (q.get("quant_type") in ("nf4", "fp4") and isinstance(q.get("blocksize"), int)
            and isinstance(q.get("double_quant"), bool)):
        raise CheckpointFormatError(f"{adapter_dir}: a lora.init loftq adapter whose record has no usable "
                                    f"quantization ({q or 'none'}); it merges into the 4-bit base it was trained on, "
                                    "so quant_type, blocksize and double_quant are needed")
    log.info("qlorakit: %s is a lora.init loftq adapter: merging it into the dequantized %s base (blocksize %d, "
             "double quantization %s) it was trained on", adapter_dir, q["quant_type"], q["blocksize"],
             "on" if q["double_quant"] else "off")
    return q


def _dequantized(weight: torch.Tensor, quant: dict) -> torch.Tensor:
    """dequantize(quantize(weight)) in fp32, [out, in]: the 4-bit base a loftq adapter was trained on."""
    packed, state = kernels.call("quantize_4bit", weight, quant["blocksize"], quant["quant_type"],
                                 quant["double_quant"])
    return kernels.call("dequantize_4bit", packed, state, torch.float32)


def _read_raw_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: not readable JSON ({err})") from None


def _check_targets(src: Path, checkpoint, where: dict[str, Path], deltas: dict[str, LoraDelta],
                   four_bit: set[str]) -> None:
    """Every adapted weight is stored, with the adapter's [out, in] shape (headers only, no tensor data)."""
    missing = [k for k in deltas if k not in where]
    if missing:
        raise CheckpointFormatError(f"{src}: no tensor {missing[0]!r} for the adapter's "
                                    f"{missing[0].removesuffix('.weight')} ({len(missing)} of {len(deltas)} "
                                    "adapted weights missing); is this the adapter's base model?")
    marker = "." + QUANT_STATE_KEY
    meta_keys = {k.split(marker)[0]: k for k in where if marker in k}  # weight name -> its quant-state entry
    for key, delta in deltas.items():
        with safe_open(str(where[key]), framework="pt") as f:
            if key in four_bit:
                shape = list(quant_state_blob(f.get_tensor(meta_keys[key]))["shape"])
            else:
                shape = list(f.get_slice(key).get_shape())
        if shape != delta.shape:
            raise CheckpointFormatError(f"{where[key]}: {key} has shape {shape}, the adapter's update "
                                        f"(lora_B @ lora_A) is {delta.shape}")
