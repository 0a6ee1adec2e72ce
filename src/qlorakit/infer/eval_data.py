"""`qlorakit eval --data / --config`: the examples, tokenized and masked by the data layer exactly as `qlorakit train`
tokenizes and masks them, and the mean loss over their response tokens.

The loss is the one training's eval reports (train/forward.py `evaluate`): -log p(label[t+1] | tokens ..t),
summed over the target tokens (labels not IGNORE_INDEX, the first token of an example never one) and divided by
their count. Examples are not packed: each row is one example, right-padded, with an attention mask and positions
from 0, so no example sees another. The decoder's hidden states at target positions go through the LM head in
chunks of rows, logits in the compute dtype, cross-entropy in fp32, each batch's sum added up in float64, so the
logits of a whole batch never exist at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import IGNORE_INDEX, TokenizedExamples
from ..errors import QloraConfigError
from ..options import EvalOptions

CHUNK_ROWS = 4096  # target tokens per chunk of logits (4096 x a 49k vocabulary in fp32: 0.8 GB)


@dataclass(frozen=True)
class EvalData:
    """Where the examples come from, in words for the table and JSON, and how to tokenize them."""

    label: str
    source: str
    held_out: bool
    settings: dict[str, Any]

    def examples(self, tokenizer: Any) -> TokenizedExamples:
        """The examples as this tokenizer renders them (DataFormatError, one line naming the file, for bad data)."""
        from ..data import prepare_data

        prepared = prepare_data(**self.settings, tokenizer=tokenizer, cache_dir=None)
        if not self.held_out:
            return prepared.train
        if prepared.eval is None:
            raise QloraConfigError(f"{self.source}: holds no examples out (data.eval_fraction 0 and no "
                                   "data.eval_file); give --data FILE to evaluate a whole file")
        return prepared.eval


def eval_data(opts: EvalOptions) -> EvalData | None:
    """--data: every record of the file, rendered with the data flags; --config: the held-out examples of that
    training config, rendered as it trains. None when neither is given."""
    from ..data.readers import resolve_data_path

    if opts.data:
        path = resolve_data_path(opts.data)
        settings = dict(path=path, fmt=opts.format, max_seq_length=opts.max_seq_length, template=opts.template,
                        overlong=opts.overlong, text_field=opts.text_field, messages_field=opts.messages_field,
                        eval_fraction=0.0)
        return EvalData(opts.data, str(path), False, settings)
    if not opts.config:
        return None
    from ..config import load_config

    cfg = load_config(opts.config)
    if cfg.training.objective != "sft":
        raise QloraConfigError(f"{opts.config}: training.objective {cfg.training.objective} holds out preference "
                               "pairs; qlorakit eval measures the next-token loss of sft data (give --data FILE)")
    d = cfg.data
    settings = dict(path=resolve_data_path(d.path), fmt=d.format, max_seq_length=cfg.training.max_seq_length,
                    template=d.template, train_on_inputs=d.train_on_inputs, overlong=d.overlong,
                    text_field=d.text_field, messages_field=d.messages_field,
                    eval_file=resolve_data_path(d.eval_file) if d.eval_file else None,
                    eval_fraction=d.eval_fraction, max_eval_examples=d.max_eval_examples, seed=cfg.training.seed)
    label = f"{Path(d.eval_file).name if d.eval_file else d.path} held out by {Path(opts.config).name}"
    return EvalData(label, opts.config, True, settings)


@dataclass(frozen=True)
class DataLoss:
    """Mean loss per target token (nats), over `tokens` target tokens of `examples` examples."""

    loss: float
    tokens: int
    examples: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))  # as training's eval reports it

    def to_json(self) -> dict[str, float | int]:
        return {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens, "examples": self.examples}


@torch.no_grad()
def response_loss(model: nn.Module, examples: TokenizedExamples, pad_id: int, batch_size: int,
                  device: torch.device, progress: bool = True) -> DataLoss:
    """The mean loss over the target tokens of `examples` (module docstring); batches of `batch_size` examples of
    similar length, on `device`."""
    order = np.argsort(examples.lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    total, count = 0.0, 0
    for rows in tqdm(batches, desc="data loss", unit="batch", disable=not progress, leave=False):
        batch = examples.collate([[int(i)] for i in rows], pad_id)
        hidden = decoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         position_ids=batch["position_ids"].to(device), use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:].to(device)
        keep = targets != IGNORE_INDEX
        h, t = hidden[:, :-1][keep], targets[keep]
        for start in range(0, t.numel(), CHUNK_ROWS):
            logits = head(h[start:start + CHUNK_ROWS]).float()
            total += float(F.cross_entropy(logits, t[start:start + CHUNK_ROWS], reduction="sum"))
        count += int(t.numel())
    return DataLoss(total / max(1, count), count, len(examples))
