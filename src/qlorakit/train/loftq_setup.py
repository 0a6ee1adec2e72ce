"""lora.init loftq's calibration, from the config and the training split: which tokens the LoRA-targeted linears'
inputs are measured on (model/loftq_calibration.py), and what the adapter's record says of it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..config import QloraConfig
from ..data.pair_examples import PairExamples
from ..model.loftq_init import LoftqCalibration

log = logging.getLogger("qlorakit.train")


def calibration_sequences(examples: Any, tokens: int) -> list[torch.Tensor]:
    """The first `tokens` tokens of the training examples, in their order, as one int64 [L] CPU tensor per example
    (the last one cut short; fewer tokens where the split holds fewer): an SFT example's ids, a preference pair's
    prompt followed by its chosen reply."""
    out: list[torch.Tensor] = []
    left = tokens
    for i in range(len(examples)):
        if left <= 0:
            break
        if isinstance(examples, PairExamples):
            prompt, chosen, _ = examples.get(i)
            ids = np.concatenate([prompt, chosen])
        else:
            ids = examples.get(i)[0]
        ids = ids[:left]
        if len(ids):
            out.append(torch.from_numpy(ids.astype(np.int64)))
            left -= len(ids)
    return out


def loftq_calibration(cfg: QloraConfig, train_examples: Any) -> LoftqCalibration | None:
    """The calibration lora.init loftq runs with (None: the plain weight SVD, said in the log). ValueError when
    calibration is configured and no training examples are given (a caller's mistake)."""
    lo = cfg.lora
    if lo.loftq_calibration == "none":
        log.info("qlorakit: lora.init loftq: lora.loftq_calibration none: the adapters start from the plain SVD of "
                 "the quantization error, blind to the layers' inputs")
        return None
    if train_examples is None:
        raise ValueError(f"lora.loftq_calibration {lo.loftq_calibration} needs the training examples")
    sequences = calibration_sequences(train_examples, lo.loftq_calibration_tokens)
    got = sum(len(s) for s in sequences)
    if got < lo.loftq_calibration_tokens:
        log.warning("qlorakit: lora.init loftq: lora.loftq_calibration_tokens is %d but the training split holds "
                    "%d tokens: calibrating on all of them", lo.loftq_calibration_tokens, got)
    return LoftqCalibration(lo.loftq_calibration, sequences)


def loftq_record(cfg: QloraConfig, train_examples: Any) -> dict[str, Any]:
    """What a loftq adapter's record says of its calibration: method, tokens, damping; {"method": "none"}."""
    lo = cfg.lora
    if lo.loftq_calibration == "none":
        return {"method": "none"}
    tokens = sum(len(s) for s in calibration_sequences(train_examples, lo.loftq_calibration_tokens))
    return {"method": lo.loftq_calibration, "tokens": tokens, "damping": LoftqCalibration.damping}
