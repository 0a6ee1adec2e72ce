"""The data layer: local files in the alpaca, chat or text format -> tokenised, masked, cached examples, and
the deterministic batch plans and collated tensors the training loop consumes. Depends on the tokenizer only.
"""

from .collate import collate, packed_attention_mask
from .examples import TokenizedExamples, split_eval
from .packing import epoch_batches
from .pieces import IGNORE_INDEX
from .prepare import PreparedData, prepare_data
from .readers import load_records
from .report import DataReport, TokenizeStats

__all__ = [
    "IGNORE_INDEX",
    "DataReport",
    "PreparedData",
    "TokenizeStats",
    "TokenizedExamples",
    "collate",
    "epoch_batches",
    "load_records",
    "packed_attention_mask",
    "prepare_data",
    "split_eval",
]
