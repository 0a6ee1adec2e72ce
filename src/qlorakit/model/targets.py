"""Which linear layers of a Hugging Face causal LM hold 4-bit weights.

The rule is the one transformers + bitsandbytes apply when they quantize on load, so that a checkpoint that
qlorakit writes and one that transformers writes quantize the same modules (a pre-quantized checkpoint only loads
when both agree). A module is a target when

* its type is exactly `torch.nn.Linear` (subclasses are someone's custom layer and are left alone), or
  transformers' `Conv1D` (GPT-2 style, weight stored [in_features, out_features]; quantized as its transpose);
* it is not the output embedding (`model.get_output_embeddings()`, the LM head);
* none of its parameters is shared with another module (tied weights, e.g. a head tied to the input embedding);
* it does not own the model's last registered parameter (transformers keeps that module unquantized; in a
  causal LM it is the head, or, when the head is tied, a norm that is not a linear anyway);
* its path does not match the architecture's `_keep_in_fp32_modules` / `_keep_in_fp32_modules_strict`.

Module paths match an excluded name as transformers matches them: the excluded name is a dotted prefix of the
path, or the path ends with it. For decoder-only models the targets are exactly the linear layers inside the
transformer blocks (attention q/k/v/o, MLP gate/up/down).

The architecture comes from config.json alone: it is built on the meta device, so no weights are read or
allocated. Remote code (`auto_map`) is never run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointFormatError
from .checkpoint_files import first_line


@dataclass(frozen=True)
class TargetLinear:
    """A linear layer to quantize. `transposed`: stored as [in_features, out_features] (Conv1D)."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    transposed: bool = False

    @property
    def weight_key(self) -> str:
        return self.name + ".weight"


def load_causal_lm_config(model_dir: str | Path):
    """The transformers config of `model_dir`/config.json; CheckpointFormatError when transformers cannot read it."""
    import transformers
    from transformers import AutoConfig

    config_path = Path(model_dir) / "config.json"
    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError) as err:
        raise CheckpointFormatError(
            f"{config_path}: transformers {transformers.__version__} cannot read it ({_first_sentence(err)}); "
            "allowed: a model_type that transformers knows, without custom code (auto_map)"
        ) from None


def meta_causal_lm(config, where: str = "config.json") -> nn.Module:
    """The causal-LM architecture of `config`, with every parameter on the meta device (no memory, no weights).

    `where` names the config's origin in error messages.
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as err:
        model_type = getattr(config, "model_type", "?")
        raise CheckpointFormatError(
            f"{where}: model_type {model_type!r} is not a causal-LM architecture that transformers can build "
            f"({_first_sentence(err)}); allowed: model types AutoModelForCausalLM supports (llama, mistral, ...)"
        ) from None


def find_target_linears(model: nn.Module) -> dict[str, TargetLinear]:
    """Target linear layers of `model` (see the module docstring), by module path, in registration order."""
    from transformers.pytorch_utils import Conv1D

    excluded = _excluded_names(model)
    targets: dict[str, TargetLinear] = {}
    for name, module in model.named_modules():
        if not name or _matches_any(name, excluded):
            continue
        if type(module) is nn.Linear:
            targets[name] = TargetLinear(name, module.in_features, module.out_features, module.bias is not None)
        elif isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            targets[name] = TargetLinear(name, int(in_features), int(out_features), module.bias is not None, True)
    return targets


def target_linears_of(model_dir: str | Path) -> dict[str, TargetLinear]:
    """find_target_linears for the architecture that `model_dir`/config.json describes."""
    return find_target_linears(meta_causal_lm(load_causal_lm_config(model_dir), str(Path(model_dir) / "config.json")))


def _excluded_names(model: nn.Module) -> set[str]:
    excluded: set[str] = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        excluded.update(name for name, module in model.named_modules() if module is head)

    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for names in owners.values():
        if len(names) > 1:
            excluded.update(n.removesuffix(".weight") for n in names)

    last = list(model.named_parameters())
    if last:
        excluded.add(last[-1][0].removesuffix(".weight"))

    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        excluded.update(getattr(model, attr, None) or ())
    return excluded


def _matches_any(path: str, names: set[str]) -> bool:
    return any(path == n or path.startswith(n + ".") or path.endswith(n) for n in names)


def _first_sentence(err: BaseException) -> str:
    # transformers' messages run to several sentences (or a list of every supported class); one is enough here.
    return first_line(err).split(". ")[0].rstrip(".")
