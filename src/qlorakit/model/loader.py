"""Load a Hugging Face causal LM with its block linears quantized to 4 bits while the shards are read.

The architecture is built with empty (meta) parameters; tensors are then read one at a time from the
safetensors shards: each target linear's weight is quantized on the target device as it arrives and never
kept in 16 bits, everything else is placed in the compute dtype. Peak host memory stays near one tensor.

A checkpoint already in bitsandbytes' 4-bit format (written by `qlorakit quantize`, or by transformers +
bitsandbytes `save_pretrained`) is recognised from its tensor names: each 4-bit linear is built from its stored
packed weight and quantization state, never quantized again, and the folder's quant type and block size win
over the requested ones (the log says so when they differ). Linears it stores in 16 bits stay 16-bit.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .. import kernels
from ..errors import CheckpointFormatError, QlorakitError
from ..nn.linear4bit import Linear4bit
from ..quant.bnb_format import WEIGHT_STATE_MARK, quant_state_from_tensors
from .checkpoint_files import CheckpointFiles, find_checkpoint_files
from .targets import TargetLinear, find_target_linears

log = logging.getLogger("qlorakit.model")

TESTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_QSTATE_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state")


@dataclass
class LoadReport:
    model_dir: str
    architecture: str
    quantized_linears: int = 0
    prequantized: bool = False
    unquantized_linears: int = 0  # target linears a pre-quantized folder stores in 16 bits (kept so)
    seconds: float = 0.0
    peak_host_mib_before: float = 0.0
    peak_host_mib_after: float = 0.0
    largest_tensor_mib: float = 0.0

    @property
    def peak_host_growth_mib(self) -> float:
        return max(0.0, self.peak_host_mib_after - self.peak_host_mib_before)

    def line(self) -> str:
        kind = "read pre-quantized" if self.prequantized else "quantized while loading"
        if self.unquantized_linears:
            kind += f" ({self.unquantized_linears} more stored in 16 bits stay 16-bit)"
        return (
            f"loaded {self.architecture} from {self.model_dir} in {self.seconds:.1f} s: {self.quantized_linears} "
            f"linears {kind}; peak host memory grew {self.peak_host_growth_mib:.0f} MiB "
            f"(largest tensor {self.largest_tensor_mib:.1f} MiB)"
        )


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_empty_model(model_dir: Path, compute_dtype: torch.dtype, attn_implementation: str,
                      trust_remote_code: bool) -> nn.Module:
    """The architecture of model_dir with parameters on the meta device (buffers such as RoPE are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as err:
        raise CheckpointFormatError(f"{model_dir}/config.json: {str(err).splitlines()[0]}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the 4-bit tensors are read by qlorakit, not by transformers
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if getattr(config, "auto_map", None) and not trust_remote_code:
        # transformers ignores the auto_map of a model_type it knows without a word; say which code runs.
        log.warning("qlorakit: %s/config.json names custom code (auto_map), which is not run without "
                    "trust_remote_code (model.trust_remote_code: true); using transformers' built-in %s classes",
                    model_dir, config.model_type)
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(
                config, dtype=compute_dtype, attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        except ValueError as err:
            raise CheckpointFormatError(
                f"{model_dir}/config.json: {arch!r} is not a causal LM that transformers knows "
                f"({str(err).splitlines()[0]})"
            ) from None
    if type(model).__name__ not in TESTED_ARCHITECTURES:
        log.warning("qlorakit: %s is not among the tested architectures (%s); it may work",
                    type(model).__name__, ", ".join(TESTED_ARCHITECTURES))
    return model


def buffers_to(model: nn.Module, device: torch.device) -> int:
    """Move every buffer that is not on `device` there (the ones the architecture computed itself, e.g. RoPE's
    inv_freq, are built on the CPU); returns how many moved. A buffer left on the CPU would be copied to the GPU
    on every forward (a host wait each time), and such a copy cannot be captured in a CUDA graph."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    moved = 0
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)
                moved += 1
    return moved


def _owner_of(key: str, targets: dict[str, TargetLinear]) -> tuple[str, str] | None:
    """(target module path, 'weight' | 'bias') if `key` belongs to a target linear."""
    if ".weight" in key:
        owner, _, rest = key.partition(".weight")
        if owner in targets and (rest == "" or rest.lstrip(".").split(".")[0] in _QSTATE_PARTS):
            return owner, "weight"
    owner, _, leaf = key.rpartition(".")
    if owner in targets and leaf == "bias":
        return owner, "bias"
    return None


def _place(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


class _LinearBuilder:
    """Collects a target linear's tensors as they are read and builds its layer once they are all there."""

    def __init__(self, model: nn.Module, targets: dict[str, TargetLinear], report: LoadReport,
                 device: torch.device, load_in_4bit: bool, quant_type: str, blocksize: int, double_quant: bool,
                 compute_dtype: torch.dtype, stored_4bit: dict[str, set[str]]):
        self.model, self.targets, self.report, self.device = model, targets, report, device
        self.load_in_4bit, self.quant_type, self.blocksize = load_in_4bit, quant_type, blocksize
        self.double_quant, self.compute_dtype = double_quant, compute_dtype
        self.stored_4bit = stored_4bit  # module -> the keys of its stored 4-bit weight (see stored_4bit_weights)
        self.held: set[tuple[str, int, bool]] = set()  # (quant type, block size, double quant) found stored
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.done: set[str] = set()

    def add(self, owner: str, key: str, tensor: torch.Tensor) -> None:
        self.pending.setdefault(owner, {})[key] = tensor
        self._try(owner)

    def _try(self, owner: str) -> None:
        tensors, prefix = self.pending[owner], owner + "."
        if owner in self.stored_4bit:
            if not self.stored_4bit[owner] <= tensors.keys():
                return  # a part of this layer's state is still to come (it may sit in another shard)
            packed, state = quant_state_from_tensors(prefix, tensors, where=self.report.model_dir)
            if len(state.shape) != 2:
                raise CheckpointFormatError(f"{self.report.model_dir}: {prefix}weight has shape {list(state.shape)}; "
                                            "a 4-bit linear weight must be 2-D [out_features, in_features]")
            layer: nn.Module = Linear4bit(packed.to(self.device), state.to(self.device))
            layer.dtype = self.compute_dtype
            self.held.add((state.quant_type, state.blocksize, state.nested is not None))
            self.report.prequantized = True
        elif prefix + "weight" in tensors:
            w = tensors[prefix + "weight"]
            self.report.largest_tensor_mib = max(self.report.largest_tensor_mib, w.numel() * w.element_size() / 2**20)
            w = w.to(self.device)
            if self.targets[owner].transposed:  # Conv1D stores [in_features, out_features]
                w = w.t().contiguous()
            if self.load_in_4bit and not self.stored_4bit:
                packed, state = kernels.call("quantize_4bit", w, self.blocksize, self.quant_type, self.double_quant)
                state.dtype = self.compute_dtype
                layer = Linear4bit(packed, state)
            else:  # a 16-bit base, or a linear that a pre-quantized folder keeps in 16 bits
                layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                layer.weight = nn.Parameter(w.to(self.compute_dtype), requires_grad=False)
                self.report.unquantized_linears += int(self.load_in_4bit)
        else:
            return
        if prefix + "bias" in tensors:
            layer.bias = nn.Parameter(tensors[prefix + "bias"].to(self.device, self.compute_dtype),
                                      requires_grad=False)
        self.report.quantized_linears += int(isinstance(layer, Linear4bit))
        _replace(self.model, owner, layer)
        self.done.add(owner)
        del self.pending[owner]

    def add_bias(self, owner: str, key: str, tensor: torch.Tensor) -> None:
        if owner in self.done:
            self.model.get_submodule(owner).bias = nn.Parameter(
                tensor.to(self.device, self.compute_dtype), requires_grad=False)
        else:
            self.pending.setdefault(owner, {})[key] = tensor

    def say_if_settings_differ(self) -> None:
        """One line when the folder's stored 4-bit settings are not the requested ones (the folder's are used)."""
        asked = (self.quant_type, self.blocksize, self.double_quant)
        if self.held and self.held != {asked}:
            held = "; ".join(_describe(*h) for h in sorted(self.held))
            log.warning("qlorakit: %s stores its 4-bit linears as %s, the config asks for %s: using the folder's "
                        "(quantize its 16-bit checkpoint to get the config's)", self.report.model_dir, held,
                        _describe(*asked))


def _describe(quant_type: str, blocksize: int, double_quant: bool) -> str:
    return f"{quant_type}, blocksize {blocksize}, double quantization {'on' if double_quant else 'off'}"


def stored_4bit_weights(model_dir: Path, files: CheckpointFiles) -> dict[str, set[str]]:
    """Module path -> the tensor names of its 4-bit weight, for a folder in bitsandbytes' 4-bit format (empty for
    a 16/32-bit checkpoint). Refuses a config.json quantization_config that qlorakit cannot read (another method,
    bitsandbytes 8-bit) and one that promises 4-bit weights the files do not hold."""
    names = [k for keys in files.keys.values() for k in keys]
    modules = {k[: k.index(WEIGHT_STATE_MARK)] for k in names if WEIGHT_STATE_MARK in k}
    stored: dict[str, set[str]] = {m: set() for m in modules}
    for k in names:
        cut = len(k) - len(".weight") if k.endswith(".weight") else k.rfind(".weight.")
        if cut > 0 and k[:cut] in stored:
            stored[k[:cut]].add(k)
    config_path = model_dir / "config.json"
    try:
        qc = json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        qc = None  # build_empty_model reports an unreadable config.json
    if isinstance(qc, dict):
        method = qc.get("quant_method", "?")
        four_bit = method == "bitsandbytes" and qc.get("load_in_4bit", False)
        if not four_bit:
            kind = f"{method!r} 8-bit" if method == "bitsandbytes" else repr(method)
            raise CheckpointFormatError(f"{config_path}: quantization_config is {kind}; qlorakit loads "
                                        "16/32-bit checkpoints and bitsandbytes 4-bit ones (load_in_4bit)")
        if not stored:
            raise CheckpointFormatError(f"{config_path}: quantization_config says bitsandbytes 4-bit, but the "
                                        f"weight files hold no '*{WEIGHT_STATE_MARK}nf4|fp4' tensors")
    return stored


def load_model(
    model_dir: str | Path,
    *,
    load_in_4bit: bool = True,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, LoadReport]:
    """Load model_dir (a local HF folder) onto `device`, quantizing the block linears (see module docstring).

    With load_in_4bit False the model is loaded in compute_dtype (a 16-bit base, for plain LoRA); a folder in
    bitsandbytes' 4-bit format is then refused. Returns (model in eval mode with every parameter frozen,
    LoadReport).
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    files = find_checkpoint_files(model_dir)
    stored_4bit = stored_4bit_weights(model_dir, files)
    if stored_4bit and not load_in_4bit:
        raise QlorakitError(f"{model_dir}: holds bitsandbytes 4-bit weights, which load only in 4 bits; set "
                            "quantization.load_in_4bit: true (generate/chat: leave out --no-quantize), or give the "
                            "16-bit checkpoint")
    t0, peak0 = time.perf_counter(), _peak_rss_mib()
    model = build_empty_model(model_dir, compute_dtype, attn_implementation, trust_remote_code)
    report = LoadReport(str(model_dir), type(model).__name__, peak_host_mib_before=peak0)
    targets = find_target_linears(model)
    strays = sorted(set(stored_4bit) - set(targets))
    if strays:
        raise CheckpointFormatError(f"{model_dir}: {strays[0]!r} is stored in 4 bits, but it is not a linear layer "
                                    "of the transformer blocks; qlorakit reads 4-bit weights of those only")
    params = {n for n, _ in model.named_parameters()}
    builder = _LinearBuilder(model, targets, report, device, load_in_4bit, quant_type, blocksize, double_quant,
                             compute_dtype, stored_4bit)

    bar = tqdm(total=files.num_tensors(), desc="loading", unit="tensor", disable=not progress, leave=False)
    for path, keys in files.keys.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in keys:
                bar.update(1)
                owned = _owner_of(key, targets)
                if owned is not None:
                    owner, part = owned
                    (builder.add if part == "weight" else builder.add_bias)(owner, key, f.get_tensor(key))
                elif key in params:
                    t = f.get_tensor(key)
                    report.largest_tensor_mib = max(report.largest_tensor_mib, t.numel() * t.element_size() / 2**20)
                    _place(model, key, t.to(device=device, dtype=compute_dtype if t.is_floating_point() else t.dtype))
    bar.close()
    if builder.pending:
        owner = sorted(builder.pending)[0]
        raise CheckpointFormatError(f"{model_dir}: the weights of {owner!r} are missing or incomplete")
    builder.say_if_settings_differ()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointFormatError(f"{model_dir}: tensor {missing[0]!r} is not in the checkpoint "
                                    f"({len(missing)} missing)")
    buffers_to(model, torch.device(device))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    report.seconds = time.perf_counter() - t0
    report.peak_host_mib_after = _peak_rss_mib()
    return model, report
