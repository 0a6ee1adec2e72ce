"""A lora.init loftq adapter away from its 4-bit base: its export for the original 16-bit weights, and the check
that an adapter runs on the kind of base its update was fitted to.

A loftq adapter (A, B, scaling s) was trained on the dequantized 4-bit base deq = dequantize(quantize(W)) and
started at (A0, B0) with s B0 A0 a rank-r correction of R = W - deq: the truncation R_r, or the one weighted by the
layer's inputs (model/loftq_init.py). The trained model is deq + s B A. On the 16-bit weights W the update that
reproduces it is s B A - R, which is not of rank r; the export keeps what a rank-2r adapter can say exactly, the
change training made, as PEFT converts PiSSA, OLoRA and CorDA adapters for their original base at save time
(`path_initial_model_for_weight_conversion`):

    A' = [A; A0]  [2r, in_features],   B' = [B, -B0]  [out_features, 2r],   r' = 2r, alpha' = 2 alpha
    (alpha' = sqrt(2) alpha with rsLoRA), so scaling' = scaling and  W + s' B' A' = W + s B A - s B0 A0.

Against the trained model deq + s B A this differs by W - deq - s B0 A0: the part of the quantization error that
the rank-r start did not hold; for the plain init R - R_r, ||R - R_r||_F^2 = the sum of the squared singular values
of R past the r-th, per layer. It is not zero: on the deploy tests' tiny Llama at r = 8, ||R - R_r|| / ||R|| = 0.81
over its 14 linears (tests/deploy/test_deploy_loftq.py); on SmolLM2-135M, 0.81 at r = 64 and 0.94 at r = 16, and
0.87 at r = 64 for the calibrated init (which trades weight error for output error). The export
adds to W exactly what training changed, s (B A - B0 A0); the model that was trained is the 4-bit base with the
adapter as saved (qlorakit itself, or a `qlorakit quantize` checkpoint of the same settings under PEFT/bitsandbytes).

(A0, B0) come from the file stored beside the adapter (peft_format.INIT_NAME), not recomputed from W: the SVD is
not bit-reproducible across devices and libraries, and where the r-th and (r+1)-th singular values are close the
truncation can differ by as much as a singular value, so only the stored tensors give back exactly the adapter
the training started from (and the export needs no base model or SVD). The export's record keeps the base's
fingerprint, so `merge`, `generate` and `serve` still check the base it is applied to.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterMismatchError, CheckpointFormatError, QlorakitError
from .peft_format import (INIT_NAME, PEFT_PREFIX, SIDECAR_NAME, adapter_modules, quantized_base_update, read_adapter,
                          read_initial, write_adapter)

EXPORT_DIR = "adapter-16bit"  # beside a loftq run's `adapter/`

log = logging.getLogger("qlorakit.adapters")


def export_for_16bit_base(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the rank-2r adapter for the 16-bit base (module docstring) of the loftq adapter `adapter_dir` to
    `out_dir` (atomically; an existing out_dir is replaced). Its adapter_config.json is plain LoRA (PEFT's
    `init_lora_weights: true`, r' = 2r), tensors in the adapter's dtype; its record adds
    `converted_for_16bit_base: true`. QlorakitError for an adapter that is not a loftq one (it applies to the
    16-bit base as it is), CheckpointFormatError when its starting weights are missing."""
    config, tensors, record = read_adapter(adapter_dir)
    if not quantized_base_update(record):
        raise QlorakitError(f"{adapter_dir}: not a lora.init loftq adapter as trained (its record says lora_init "
                            f"{record.get('lora_init', 'default')!r}); it applies to the 16-bit base as it is")
    initial = read_initial(adapter_dir, tensors)
    if initial is None:
        raise CheckpointFormatError(f"{adapter_dir}: a lora.init loftq adapter without {INIT_NAME} (its starting "
                                    "weights), which the export for the 16-bit base subtracts")
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in adapter_modules(tensors, adapter_dir).items():
        key = f"{PEFT_PREFIX}{module}"
        out[f"{key}.lora_A.weight"] = torch.cat([a, initial[f"{key}.lora_A.weight"]], dim=0).contiguous()
        out[f"{key}.lora_B.weight"] = torch.cat([b, -initial[f"{key}.lora_B.weight"]], dim=1).contiguous()
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora"))
    converted = dict(config, r=2 * r, lora_alpha=alpha * math.sqrt(2) if rslora else 2 * alpha,
                     init_lora_weights=True)
    written = write_adapter(out_dir, converted, out, dict(record, converted_for_16bit_base=True,
                                                          exported_from=str(adapter_dir), rank_before_export=r))
    log.info("qlorakit: %s: %s for the 16-bit base, rank %d: W + s (B A - B0 A0), what training changed",
             written, adapter_dir, 2 * r)
    return written


def refresh_16bit_export(adapter_dir: str | Path, out_dir: str | Path) -> Path | None:
    """After a training run saved `adapter_dir`: write its export for the 16-bit base to `out_dir` when it is a
    loftq adapter (returns out_dir); otherwise remove an export an earlier run left there (a folder whose record
    says converted_for_16bit_base, nothing else), so that out_dir never stands beside another adapter."""
    _, _, record = read_adapter(adapter_dir)
    if quantized_base_update(record):
        return export_for_16bit_base(adapter_dir, out_dir)
    sidecar = Path(out_dir) / SIDECAR_NAME
    try:
        stale = sidecar.is_file() and json.loads(sidecar.read_text(encoding="utf-8")).get("converted_for_16bit_base")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        stale = False  # not a readable export of ours: left alone
    if stale:
        shutil.rmtree(out_dir)
        log.info("qlorakit: removed %s, an earlier run's export for the 16-bit base (this adapter needs none)",
                 out_dir)
    return None


def check_base_kind(record: dict[str, Any], quantized: bool, adapter: str | Path) -> None:
    """AdapterMismatchError (one line) when a loftq adapter is to run on the 16-bit weights (its update was fitted
    to the 4-bit base: it would add the quantization error on top of W) or its 16-bit export on a 4-bit base."""
    if quantized_base_update(record) and not quantized:
        raise AdapterMismatchError(
            f"{adapter}: a lora.init loftq adapter was fitted to the 4-bit base; on the 16-bit weights it would add "
            f"the quantization error a second time: load the base in 4 bits, or use its {EXPORT_DIR}/ export")
    if record.get("converted_for_16bit_base") and quantized:
        raise AdapterMismatchError(
            f"{adapter}: the 16-bit-base export of a lora.init loftq adapter; on a 4-bit base it would subtract the "
            f"quantization error the base already lacks: load the 16-bit base, or use {record.get('exported_from')}")
