"""Pre-quantized checkpoints in the bitsandbytes 4-bit format: write one from a 16/32-bit folder, read its linears.

`quantize_checkpoint` reads a local Hugging Face causal-LM folder tensor by tensor (safetensors only, never
pickle), quantizes the target linear layers (see `targets.py`) and writes a folder that transformers +
bitsandbytes load with a plain `from_pretrained(out_dir)`: the same tensors, byte for byte, as transformers +
bitsandbytes write with `save_pretrained` after quantizing the same source on load. Every other tensor
(embeddings, norms, the head, biases) is copied in its stored dtype.

Memory: one source tensor and its quantized form at a time; output tensors are spooled to disk.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .. import kernels
from ..errors import CheckpointFormatError, QuantizationError
from ..nn.linear4bit import Linear4bit
from ..quant.blockwise import check_blocksize, check_quant_type
from ..quant.bnb_format import (
    WEIGHT_STATE_MARK,
    quant_state_from_tensors,
    quant_state_to_tensors,
    quantization_config,
)
from .checkpoint_files import INDEX_FILE, find_checkpoint_files, require_model_folder
from .output_folder import check_out_dir, commit, copy_side_files, drop_auto_map, new_partial, say_left_out
from .safetensors_writer import SafetensorsWriter
from .targets import TargetLinear, target_linears_of

log = logging.getLogger("qlorakit.model")

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")  # safetensors' names of the dtypes a weight is quantized from
_QUANT_SUFFIXES = (
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
    "bias",
)


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "bfloat16",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write a bitsandbytes-format 4-bit copy of the causal LM in `model_dir` to `out_dir`; returns out_dir.

    The output holds model.safetensors (or, for a sharded source, one output shard per source shard and
    model.safetensors.index.json), config.json with a `quantization_config` as transformers writes it
    (`compute_dtype` only goes there: it is the dtype bitsandbytes computes in after loading), and a copy of the
    other top-level files (tokenizer, generation config, ...); the source's custom code (*.py, `auto_map`) only
    with `trust_remote_code`. It is written into a temporary sibling folder and renamed into place when complete
    (see output_folder.py): an existing out_dir is replaced only with `overwrite`, only when it is empty or a
    previous `qlorakit quantize` output, and only after the new folder is complete.

    Raises CheckpointFormatError / OutputFolderError with one line naming the file or key for bad input.
    """
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    cdtype = _compute_dtype(compute_dtype)
    src = require_model_folder(model_dir)
    out = Path(out_dir)
    inputs = {"source model": src}
    check_out_dir(out, "quantize", overwrite, inputs)
    config = read_config_json(src)
    checkpoint = find_checkpoint_files(src)
    targets = target_linears_of(src)
    check_target_weights(src, targets, checkpoint.key_to_file())

    partial = new_partial(out)
    try:
        weight_map, total_size, total_params = {}, 0, 0
        with tqdm(total=checkpoint.num_tensors(), desc="quantize", unit="tensor", file=sys.stderr) as bar:
            for path, names in checkpoint.keys.items():
                writer = SafetensorsWriter(partial / path.name, metadata={"format": "pt"})
                with safe_open(str(path), framework="pt") as f, writer:
                    for name in names:
                        tensor = f.get_tensor(name)
                        total_params += tensor.numel()
                        for key, value in converted(name, tensor, targets, blocksize, quant_type, double_quant):
                            writer.add(key, value)
                            weight_map[key] = path.name
                        bar.update()
                total_size += writer.nbytes
        if checkpoint.sharded:
            index = {
                "metadata": {"total_parameters": total_params, "total_size": total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            write_json(partial / INDEX_FILE, index)
        config["quantization_config"] = quantization_config(quant_type, double_quant, cdtype)
        left_out = drop_auto_map(config, trust_remote_code)
        write_json(partial / "config.json", config)
        left_out += copy_side_files(src, partial, trust_remote_code)
        commit(partial, out, "quantize", overwrite, inputs)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    say_left_out(out, left_out)
    log.info("qlorakit: wrote %s (%d linear layers in %s, %.1f MB of weights)", out, len(targets), quant_type,
             total_size / 1e6)
    return out


def load_quantized_linears(model_dir: str | Path) -> dict[str, Linear4bit]:
    """A Linear4bit (on the CPU) per 4-bit module of a bitsandbytes-format checkpoint folder, by module path.

    Reads only the quantized modules' tensors (and their biases), streamed from model.safetensors or the shards
    of model.safetensors.index.json. Raises CheckpointFormatError when the folder holds no 4-bit weights or a
    module's entries are incomplete.
    """
    checkpoint = find_checkpoint_files(model_dir)
    where = checkpoint.key_to_file()
    modules = {name[: name.index(WEIGHT_STATE_MARK)]: where[name] for name in where if WEIGHT_STATE_MARK in name}
    if not modules:
        raise CheckpointFormatError(
            f"{checkpoint.folder}: no bitsandbytes 4-bit weights (no '*{WEIGHT_STATE_MARK}nf4|fp4' tensors) in "
            f"{', '.join(p.name for p in checkpoint.files)}"
        )
    linears: dict[str, Linear4bit] = {}
    with ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in checkpoint.files}
        for module, path in modules.items():
            prefix = module + "."
            tensors = {
                prefix + s: handles[where[prefix + s]].get_tensor(prefix + s)
                for s in _QUANT_SUFFIXES
                if prefix + s in where
            }
            packed, state = quant_state_from_tensors(prefix, tensors, where=str(path))
            if len(state.shape) != 2:
                raise CheckpointFormatError(
                    f"{path}: {prefix}weight has shape {list(state.shape)}; a 4-bit linear "
                    "weight must be 2-D [out_features, in_features]"
                )
            linears[module] = Linear4bit(packed, state, tensors.get(prefix + "bias"))
    return linears


def converted(
    name: str,
    tensor: torch.Tensor,
    targets: dict[str, TargetLinear],
    blocksize: int,
    quant_type: str,
    double_quant: bool,
) -> list[tuple[str, torch.Tensor]]:
    """The output entries for one source tensor: the bitsandbytes 4-bit entries for a target weight, else itself."""
    module = name.removesuffix(".weight") if name.endswith(".weight") else None
    target = targets.get(module) if module is not None else None
    if target is None:
        return [(name, tensor)]
    # Conv1D (GPT-2) stores [in, out]; its 4-bit form is the [out, in] matrix, as transformers quantizes it.
    weight = tensor.t() if target.transposed else tensor
    packed, state = kernels.call("quantize_4bit", weight, blocksize, quant_type, double_quant)
    return list(quant_state_to_tensors(module + ".", packed, state).items())


def _compute_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in COMPUTE_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[value.removeprefix("torch.")]
    raise QuantizationError(f"compute_dtype {value!r} is not allowed; use one of {', '.join(COMPUTE_DTYPES)}")


def read_config_json(folder: Path) -> dict:
    """`folder`/config.json as a dict; refuses unreadable JSON, a non-object and an existing quantization_config."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if "quantization_config" in config:
        existing = config["quantization_config"]
        method = existing.get("quant_method", "?") if isinstance(existing, dict) else "?"
        raise CheckpointFormatError(
            f"{path}: already has a quantization_config (quant_method {method!r}); allowed: an unquantized "
            "16/32-bit checkpoint"
        )
    return config


def check_target_weights(folder: Path, targets: dict[str, TargetLinear], stored: dict[str, Path]) -> None:
    """Every target weight is stored, floating point, of the architecture's shape (read from headers only)."""
    if not targets:
        raise CheckpointFormatError(
            f"{folder / 'config.json'}: the architecture has no linear layers to quantize (nn.Linear or Conv1D "
            "outside the head)"
        )
    missing = [t.weight_key for t in targets.values() if t.weight_key not in stored]
    if missing:
        raise CheckpointFormatError(
            f"{folder}: no tensor {missing[0]!r} in the weight files ({len(missing)} of {len(targets)} linear "
            "weights missing); the tensor names must match the architecture in config.json"
        )
    with ExitStack() as stack:
        handles: dict[Path, object] = {}
        for target in targets.values():
            path = stored[target.weight_key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            piece = handles[path].get_slice(target.weight_key)
            shape, dtype = list(piece.get_shape()), piece.get_dtype()
            expected = [target.out_features, target.in_features]
            if target.transposed:
                expected.reverse()
            if shape != expected or dtype not in _FLOAT_DTYPES:
                raise CheckpointFormatError(
                    f"{path}: tensor {target.weight_key!r} is {dtype} {shape}; the architecture in config.json "
                    f"needs {expected} in one of {', '.join(_FLOAT_DTYPES)}"
                )


def write_json(path: Path, obj: object) -> None:
    """Write `obj` as transformers writes config.json and the shard index."""
    # transformers writes config.json and the index this way: 2-space indent, sorted keys, a final newline.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
