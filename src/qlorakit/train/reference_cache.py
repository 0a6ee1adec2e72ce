"""training.precompute_ref_logps: every pair's reference log-probs computed once, before training, and kept.

DPO and IPO compare the policy with a frozen reference (the base with the adapters off, or base + a frozen
starting adapter). Its log-probs never change during a run, so instead of a reference forward in every step they
can be computed in one pass over the training and held-out pairs (TRL's `precompute_ref_log_probs`). The pass runs
in eval mode (no LoRA dropout), without gradients, in micro-batches of training.batch_size pairs ordered by length
(less padding), through the same `reference_logps` the step would call.

The values are written to OUTPUT_DIR/ref_logps.safetensors (float32 [n, 2] per split: chosen, rejected) with a key
that hashes what they depend on: the tokenized pairs of both splits, the base's fingerprint, its quantization,
the compute dtype and the reference (the base, or the starting adapter's tensors). A later run with the same key
(a resumed run, or a new one in the same folder) reuses them, so resuming stays exact; any other key recomputes
them. Under DDP every rank computes all pairs (each needs them for its share) and the first writes the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load, save
from tqdm.auto import tqdm

from ..atomic import write_bytes
from ..data.pair_examples import PairExamples
from .distributed import SINGLE_PROCESS, DistContext
from .preference import reference_logps
from .runtime import Runtime

log = logging.getLogger("qlorakit.train")

FILE = "ref_logps.safetensors"


def cache_key(splits: dict[str, PairExamples], fingerprint: str, quantization: dict, compute_dtype: torch.dtype,
              adapter: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> str:
    """sha256 over everything the reference log-probs of `splits` depend on (module docstring)."""
    h = hashlib.sha256()
    h.update(json.dumps({"fingerprint": fingerprint, "quantization": quantization, "dtype": str(compute_dtype),
                         "splits": sorted(splits)}, sort_keys=True).encode())
    for name in sorted(splits):
        for array in splits[name].fingerprint_arrays():
            h.update(np.ascontiguousarray(array).tobytes())
    h.update(b"base" if adapter is None else b"adapter")
    for name in sorted(adapter or {}):
        for t in adapter[name]:
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_reference(model: torch.nn.Module, examples: PairExamples, batch_size: int, runtime: Runtime,
                      pad_id: int, adapter: dict | None, bar=None) -> np.ndarray:
    """float32 [n, 2]: the (chosen, rejected) reference log-probs of each pair of `examples`."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(examples), 2), dtype=np.float32)
    order = np.argsort(examples.lengths, kind="stable")
    try:
        for start in range(0, len(order), batch_size):
            rows = [[int(i)] for i in order[start:start + batch_size]]
            batch = {k: v.to(runtime.device) for k, v in examples.collate(rows, pad_id).items()}
            with runtime.autocast():
                ref = reference_logps(model, batch, adapter)
            index = [r[0] for r in rows]
            out[index, 0] = ref.chosen.float().cpu().numpy()
            out[index, 1] = ref.rejected.float().cpu().numpy()
            if bar is not None:
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return out


def with_reference_logps(prepared: SimpleNamespace, model: torch.nn.Module, out_dir: Path, key_parts: dict,
                         batch_size: int, runtime: Runtime, pad_id: int, adapter: dict | None, progress: bool,
                         dist: DistContext = SINGLE_PROCESS) -> SimpleNamespace:
    """`prepared` (train and eval PairExamples, eval possibly None) with their reference log-probs attached,
    read from OUTPUT_DIR/ref_logps.safetensors when its key matches, computed (and written) otherwise.
    key_parts: fingerprint, quantization (dict) and compute_dtype for cache_key."""
    splits = {name: ex for name, ex in (("train", prepared.train), ("eval", prepared.eval)) if ex is not None}
    key = cache_key(splits, adapter=adapter, **key_parts)
    path = Path(out_dir) / FILE
    values = _read(path, key, splits)
    if values is None:
        start = time.perf_counter()
        total = sum(len(ex) for ex in splits.values())
        with tqdm(total=total, desc="reference log-probs", unit="pair", disable=not progress or not dist.is_main,
                  leave=False) as bar:
            values = {name: compute_reference(model, ex, batch_size, runtime, pad_id, adapter, bar)
                      for name, ex in splits.items()}
        if dist.is_main:
            write_bytes(path, save(values, metadata={"key": key}))
        log.info("qlorakit: reference log-probs of %d pairs computed in %.1f s, kept in %s (training steps run no "
                 "reference forward)", total, time.perf_counter() - start, path)
    else:
        log.info("qlorakit: reference log-probs of %d pairs read from %s (same pairs, base and reference)",
                 sum(len(v) for v in values.values()), path)
    return SimpleNamespace(**{**vars(prepared), **{name: splits[name].with_reference(values[name])
                                                   for name in splits}})


def _read(path: Path, key: str, splits: dict[str, PairExamples]) -> dict[str, np.ndarray] | None:
    """The stored values if `path` holds them under `key` for these splits' sizes; None otherwise (absent,
    another key, unreadable: they are then computed again and the file replaced)."""
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        if metadata.get("key") != key:
            log.info("qlorakit: %s was computed for other pairs, base or reference: computing them again", path)
            return None
        values = load(data)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        log.warning("qlorakit: %s could not be read (%s): computing the reference log-probs again", path, err)
        return None
    if set(values) != set(splits) or any(values[n].shape != (len(ex), 2) for n, ex in splits.items()):
        return None
    return {name: values[name].astype(np.float32) for name in splits}
