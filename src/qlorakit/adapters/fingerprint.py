"""A base model's identity, so that an adapter is never silently applied to another base.

sha256 over: config.json without fields that do not change the weights (quantization, dtype, versions, paths);
every weight's logical name and shape (a 4-bit weight counts with its original shape, its quantization
constants are ignored); and the first 4096 values of the input embedding, which every format keeps as stored.
A 16-bit checkpoint and its 4-bit quantization by qlorakit or bitsandbytes therefore share one fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

from ..model.checkpoint_files import find_checkpoint_files
from ..quant.bnb_format import quant_state_blob

# auto_map only points at custom code, which merge and quantize leave out unless asked: the weights are the same.
_VOLATILE_CONFIG_KEYS = {"quantization_config", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                         "use_cache", "_attn_implementation_autoset", "architectures_autoset", "auto_map"}
_QSTATE_MARKERS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.")


def base_fingerprint(model_dir: str | Path) -> str:
    files = find_checkpoint_files(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS},
                        sort_keys=True).encode())
    shapes: dict[str, list[int]] = {}
    logical_4bit: dict[str, list[int]] = {}
    embed_key, embed_file = None, None
    for path, names in files.keys.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                if any(m in name for m in _QSTATE_MARKERS):
                    if ".quant_state." in name:
                        meta = quant_state_blob(f.get_tensor(name))
                        logical_4bit[name.split(".quant_state.")[0]] = list(meta["shape"])
                    continue
                shape = list(f.get_slice(name).get_shape())
                shapes[name] = shape
                if embed_key is None and name.endswith("embed_tokens.weight"):
                    embed_key, embed_file = name, path
    shapes.update(logical_4bit)  # a packed 4-bit weight counts with its original shape
    h.update(json.dumps(sorted(shapes.items())).encode())
    if embed_key is not None:
        with safe_open(str(embed_file), framework="pt") as f:
            sample = f.get_tensor(embed_key).reshape(-1)[:4096].float().numpy().tobytes()
        h.update(sample)
    return h.hexdigest()
