"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors (no pickle).

Tensor keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, what PEFT's
`PeftModel.from_pretrained` and vLLM load. The config has no DoRA and no modules_to_save, so vLLM accepts it.
qlorakit's own record (the base model's identity, the quantization used, training facts) goes into a sidecar
`qlorakit_adapter.json` and the safetensors metadata, because PEFT warns about unknown keys in
adapter_config.json.

An adapter that did not start from the default init (lora.init loftq) also holds its starting weights,
`adapter_init.safetensors` (same keys and shapes), and its record says `"lora_init": "loftq"`. Its
adapter_config.json keeps PEFT's `"init_lora_weights": true`: PEFT 0.21 refuses "loftq" there without a
loftq_config and, with one, runs LoftQ again while loading, replacing the base's weights (on CUDA only); vLLM
refuses "loftq" outright. The saved tensors are a plain LoRA for the 4-bit base they were trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..assets import MODEL_NAME
from ..atomic import new_folder
from ..errors import AdapterMismatchError, CheckpointFormatError
from ..nn.lora import LoraLinear
from ..sharding import copy_whole_into, full

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SIDECAR_NAME = "qlorakit_adapter.json"
INIT_NAME = "adapter_init.safetensors"
DEFAULT_BASE_HUB_ID = f"HuggingFaceTB/{MODEL_NAME}"  # the hub id of the bundled default model ('default')


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module, source=None) -> dict[str, torch.Tensor]:
    """PEFT-keyed LoRA tensors of `model` (contiguous CPU copies, in the adapter dtype). Sharded (FSDP2) adapters
    are gathered whole: then every rank must call this together. `source(parameter)`, when given, supplies each
    tensor instead (an optimizer's fp32 master copy of a parameter kept in a lower precision)."""
    def value(p: torch.Tensor) -> torch.Tensor:
        return source(p) if source is not None else full(p.detach())

    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = value(m.lora_A.weight).to("cpu").contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = value(m.lora_B.weight).to("cpu").contiguous()
    return out


def initial_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-keyed starting weights of the LoraLinear layers that record them (LoraLinear.initial_weights); {}
    when none does (the default init)."""
    out = {}
    for name, m in lora_modules(model).items():
        if m.initial_weights is not None:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.initial_weights[0].contiguous()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.initial_weights[1].contiguous()
    return out


def quantized_base_update(record: dict[str, Any]) -> bool:
    """Whether an adapter's update was fitted to the dequantized 4-bit base rather than added to the 16-bit
    weights: a lora.init loftq adapter as trained (not its export for the 16-bit base, adapters/loftq.py)."""
    return record.get("lora_init") == "loftq" and not record.get("converted_for_16bit_base")


def _target_modules(names: list[str], model: nn.Module) -> list[str]:
    """Leaf names (e.g. q_proj) when they pick out exactly the adapted modules, else the full paths."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    adapted = set(names)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in leaves and name not in adapted and not _inside_lora(name, adapted):
            if isinstance(module, (nn.Linear, LoraLinear)) or hasattr(module, "in_features"):
                return sorted(names)
    return leaves


def _inside_lora(name: str, adapted: set[str]) -> bool:
    return any(name.startswith(a + ".") for a in adapted)


def peft_base_name(name: str) -> str:
    """What adapter_config.json records as base_model_name_or_path for the base model.name `name`: the hub id of
    the bundled default model for 'default' (so `AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` finds a
    base), any other name as the user gave it."""
    return DEFAULT_BASE_HUB_ID if name == "default" else name


def peft_adapter_config(model: nn.Module, base_model_name_or_path: str | None) -> dict[str, Any]:
    mods = lora_modules(model)
    if not mods:
        raise CheckpointFormatError("the model has no LoRA layers to save")
    first = next(iter(mods.values()))
    ranks = {m.r for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise CheckpointFormatError(f"LoRA layers differ in rank/alpha ({sorted(ranks)}, {sorted(alphas)}); "
                                    "qlorakit saves adapters with one rank and alpha")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(list(mods), model),
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "bias": "none",
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _atomic_dir_write(out_dir: Path, write: Any) -> Path:
    out_dir = Path(out_dir)
    with new_folder(out_dir) as tmp:  # .<name>.tmp-*, swapped in whole (atomic.py)
        write(tmp)
    return out_dir


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    qlorakit_record: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter of `model` to `out_dir` atomically (temporary folder, then rename). `tensors`: its
    lora_state_dict, when already gathered (sharded runs gather on every rank, then one rank writes)."""
    tensors = lora_state_dict(model) if tensors is None else tensors
    config = peft_adapter_config(model, base_model_name_or_path)
    record, initial = dict(qlorakit_record or {}), initial_state_dict(model)
    if "lora_init" in record or initial:  # what the layers hold decides (a forced resume may change the config's)
        record["lora_init"] = "loftq" if initial else "default"
    return write_adapter(out_dir, config, tensors, record, initial)


def write_adapter(out_dir: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                  record: dict[str, Any], initial: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an adapter folder atomically: adapter_config.json, the PEFT-keyed tensors, the qlorakit record and,
    when given, the starting weights (INIT_NAME)."""
    meta = {"format": "pt"}
    if "base_fingerprint" in record:
        meta["qlorakit.base_fingerprint"] = str(record["base_fingerprint"])

    def write(tmp: Path) -> None:
        for name, values in ((WEIGHTS_NAME, tensors), (INIT_NAME, initial)):
            if values:
                save_file(values, str(tmp / name), metadata=meta)
                # safetensors creates its file 0o600; give it the mode open() would (0o666 & ~umask), read off the
                # folder just made with mkdir (0o777 & ~umask), so others can read it like the JSON files.
                os.chmod(tmp / name, tmp.stat().st_mode & 0o666)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / SIDECAR_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    return _atomic_dir_write(Path(out_dir), write)


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter_config, tensors keyed as saved, qlorakit record or {}) of a PEFT LoRA adapter folder, checked by
    validate_adapter: callers read this before loading any base model, so a broken adapter costs no load."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise CheckpointFormatError(f"{d}: adapter folder not found")
    for p in (cfg_path, w_path):
        if not p.is_file():
            extra = " (adapter_model.bin is not loaded: pickle files can run code)" if p == w_path else ""
            raise CheckpointFormatError(f"{d}: missing {p.name}{extra}")
    config = _read_json_object(cfg_path)
    sidecar = d / SIDECAR_NAME
    record = _read_json_object(sidecar) if sidecar.is_file() else {}
    tensors = _read_tensors(w_path)
    validate_adapter(d, config, tensors)
    return config, tensors, record


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointFormatError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                                    f"{err.start})") from None
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.stat().st_size == 0:
        raise CheckpointFormatError(f"{path}: the file is empty (an interrupted save?); save the adapter again")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise CheckpointFormatError(f"{path}: not a complete safetensors file ({err}); save the adapter "
                                    "again") from None


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    *,
    base_fingerprint: str | None = None,
    force: bool = False,
    require_init: bool = False,
) -> dict[str, Any]:
    """Copy a saved adapter's tensors into the LoraLinear layers of `model` (already injected, same shapes), and
    its starting weights (INIT_NAME), when the folder has them, into their `initial_weights`. `require_init`: a
    lora.init loftq adapter without them is refused (a training checkpoint, whose final adapter must carry them).

    If both the adapter and the caller know the base model's fingerprint and they differ, refuse with
    AdapterMismatchError unless force. Returns the adapter's qlorakit record.
    """
    _, tensors, record = read_adapter(adapter_dir)
    initial = read_initial(adapter_dir, tensors)
    if require_init and initial is None and quantized_base_update(record):
        raise CheckpointFormatError(f"{adapter_dir}: a lora.init loftq adapter without its {INIT_NAME} (its "
                                    "starting weights); resume from an intact checkpoint or start over")
    saved_fp = record.get("base_fingerprint")
    if base_fingerprint and saved_fp and saved_fp != base_fingerprint and not force:
        raise AdapterMismatchError(
            f"{adapter_dir}: adapter was trained on another base model (fingerprint {saved_fp[:12]}, "
            f"base {record.get('base_model', '?')}), this base is {base_fingerprint[:12]}; "
            "use --force to load it anyway"
        )
    mods = lora_modules(model)
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        sample = sorted(missing or unexpected)[0]
        raise CheckpointFormatError(
            f"{adapter_dir}: adapter does not fit this model ({len(missing)} LoRA tensors missing, "
            f"{len(unexpected)} unexpected, e.g. {sample!r})"
        )
    with torch.no_grad():
        for name, m in mods.items():
            for ab, lin in (("A", m.lora_A), ("B", m.lora_B)):
                t = tensors[f"{PEFT_PREFIX}{name}.lora_{ab}.weight"]
                if t.shape != lin.weight.shape:
                    raise CheckpointFormatError(f"{adapter_dir}: {name}.lora_{ab} has shape {list(t.shape)}, "
                                                f"the model expects {list(lin.weight.shape)}")
                copy_whole_into(lin.weight, t)
            if initial is not None:
                m.initial_weights = tuple(initial[f"{PEFT_PREFIX}{name}.lora_{ab}.weight"] for ab in "AB")
    return record


def read_initial(adapter_dir: str | Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The starting weights stored beside an adapter (INIT_NAME), checked against its tensors (same keys, shapes
    and dtypes); None when the folder has none."""
    path = Path(adapter_dir) / INIT_NAME
    if not path.is_file():
        return None
    initial = _read_tensors(path)
    for key, t in tensors.items():
        got = initial.get(key)
        if got is None or got.shape != t.shape or got.dtype != t.dtype or not torch.isfinite(got).all():
            have = "missing" if got is None else f"{got.dtype} {list(got.shape)}"
            raise CheckpointFormatError(f"{path}: {key} is {have}, the adapter's is {t.dtype} {list(t.shape)} "
                                        "(finite values)")
    if initial.keys() != tensors.keys():
        extra = sorted(initial.keys() - tensors.keys())[0]
        raise CheckpointFormatError(f"{path}: holds {extra!r}, which the adapter does not")
    return initial


def adapter_modules(tensors: dict[str, torch.Tensor], where: str | Path = "adapter"
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (lora_A, lora_B) of PEFT-keyed adapter tensors, sorted by path. Any other key, or an A
    without its B (or the reverse), is a CheckpointFormatError naming `where`."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        body, _, suffix = key.rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or suffix not in ("A.weight", "B.weight"):
            raise CheckpointFormatError(f"{where}: tensor {key!r} is not a LoRA A/B weight; allowed: "
                                        f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'")
        halves.setdefault(body[len(PEFT_PREFIX):], {})[suffix[0]] = t
    out = {}
    for module, ab in sorted(halves.items()):
        if len(ab) != 2:
            have = next(iter(ab))
            raise CheckpointFormatError(f"{where}: {module} has lora_{have} but no lora_{'B' if have == 'A' else 'A'}")
        out[module] = (ab["A"], ab["B"])
    return out


def _check_adapter_config(path: Path, config: dict[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise CheckpointFormatError(f"{path}: only plain LoRA adapters are supported "
                                    f"(peft_type={config.get('peft_type')!r}, use_dora={config.get('use_dora')})")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if config.get(k) is None]
    if missing:
        raise CheckpointFormatError(f"{path}: no {missing[0]!r}; a LoRA adapter config needs r, lora_alpha and "
                                    "target_modules")
    r, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CheckpointFormatError(f"{path}: r = {r!r}; allowed: an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
        raise CheckpointFormatError(f"{path}: lora_alpha = {alpha!r}; allowed: a finite number > 0")
    names_ok = isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    if not (names_ok or isinstance(targets, str) and targets):
        raise CheckpointFormatError(f"{path}: target_modules = {targets!r}; allowed: a non-empty list of module "
                                    "names, or one string")
    if not isinstance(config.get("use_rslora", False), bool):
        raise CheckpointFormatError(f"{path}: use_rslora = {config['use_rslora']!r}; allowed: true or false")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise CheckpointFormatError(f"{path}: adapters with rank_pattern/alpha_pattern are not supported; "
                                    "allowed: one rank and alpha for every layer")
    if config.get("fan_in_fan_out"):
        raise CheckpointFormatError(f"{path}: fan_in_fan_out adapters (Conv1D bases) are not supported")
    if config.get("bias", "none") not in (None, "none"):
        raise CheckpointFormatError(f"{path}: bias = {config['bias']!r} is not supported; allowed: 'none'")
    if config.get("modules_to_save"):
        raise CheckpointFormatError(f"{path}: modules_to_save = {config['modules_to_save']!r} is not supported; "
                                    "allowed: null (qlorakit adapters hold LoRA A/B weights only)")


def validate_adapter(adapter_dir: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Check a PEFT LoRA adapter's config and tensors against each other, without any base model.

    The config needs r (an integer >= 1), lora_alpha (a finite number > 0) and target_modules (a non-empty list
    of names, or one string), and must be plain LoRA: no DoRA, rank/alpha patterns, fan_in_fan_out, bias or
    modules_to_save. The tensors must be pairs `base_model.model.<module>.lora_A.weight` [r, in_features] and
    `.lora_B.weight` [out_features, r], floating point and finite. A rank other than r would apply the update
    at the wrong scale (alpha / r), so it is refused. Raises CheckpointFormatError, one line naming the file.
    """
    cfg_path, w_path = Path(adapter_dir) / CONFIG_NAME, Path(adapter_dir) / WEIGHTS_NAME
    _check_adapter_config(cfg_path, config)
    modules = adapter_modules(tensors, w_path)
    if not modules:
        raise CheckpointFormatError(f"{w_path}: the adapter holds no LoRA tensors")
    r = config["r"]
    for module, (a, b) in modules.items():
        for ab, t in (("A", a), ("B", b)):
            if t.dim() != 2 or not t.is_floating_point():
                raise CheckpointFormatError(f"{w_path}: {module}.lora_{ab} is a {t.dim()}-d {t.dtype} tensor; "
                                            "allowed: a 2-d floating-point matrix")
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointFormatError(
                f"{cfg_path}: r is {r} but {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                f"(need [r, in_features] and [out_features, r]); with the wrong r the update's scale alpha/r "
                "would be wrong, so the adapter is refused")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CheckpointFormatError(f"{w_path}: {module} holds NaN or infinite values")


def check_adapter_fits(adapter_dir: str | Path, config: dict[str, Any],
                       modules: dict[str, tuple[torch.Tensor, torch.Tensor]], model: nn.Module) -> None:
    """Once the base's structure is known (loaded, LoRA not yet injected): every adapted module (`modules`, as
    adapter_modules gives them) is a linear layer of `model` whose [out_features, in_features] is the adapter's
    [lora_B rows, lora_A columns], and every name in a target_modules list names a module of `model`.
    CheckpointFormatError, one line, otherwise."""
    layers = dict(model.named_modules())
    for module, (a, b) in modules.items():
        layer = layers.get(module)
        if layer is None:
            raise CheckpointFormatError(f"{adapter_dir}: adapts {module!r}, which this base model does not have; "
                                        "is this the adapter's base model?")
        shape = [getattr(layer, "out_features", None), getattr(layer, "in_features", None)]
        if None in shape:
            raise CheckpointFormatError(f"{adapter_dir}: adapts {module!r}, a {type(layer).__name__} in this base "
                                        "model; LoRA applies to linear layers only")
        if shape != [b.shape[0], a.shape[1]]:
            raise CheckpointFormatError(f"{adapter_dir}: {module} is {shape} in this base model, the adapter's "
                                        f"update (lora_B @ lora_A) is {[b.shape[0], a.shape[1]]}; is this the "
                                        "adapter's base model?")
    targets = config.get("target_modules")
    for name in targets if isinstance(targets, list) else []:
        if not any(path == name or path.endswith("." + name) for path in layers):
            raise CheckpointFormatError(f"{Path(adapter_dir) / CONFIG_NAME}: target_modules names {name!r}, which "
                                        "is no module of this base model; is this the adapter's base model?")
