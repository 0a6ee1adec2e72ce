"""What `qlorakit train` sets up for a preference objective (training.objective dpo, ipo, orpo, simpo): the
pairs, tokenized or from the token cache, with the held-out split; the starting adapter (training.reference_adapter);
and the LoRA dropout the run trains with (training.disable_dropout)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

from torch import nn

from ..adapters.peft_format import load_adapter, read_adapter
from ..config import QloraConfig
from ..data.pair_cache import load_pairs
from ..data.readers import resolve_data_path
from ..errors import QloraConfigError

log = logging.getLogger("qlorakit.train")


def dropout_in_effect(cfg: QloraConfig) -> float:
    """The LoRA dropout the run trains with: lora.dropout, or 0 under training.disable_dropout, whose default is
    on for the preference objectives (TRL's trainers disable dropout) and off for sft."""
    t = cfg.training
    off = t.disable_dropout if t.disable_dropout is not None else t.objective != "sft"
    return 0.0 if off else cfg.lora.dropout


def start_from_adapter(cfg: QloraConfig, model: nn.Module, fingerprint: str) -> None:
    """training.reference_adapter: the policy starts from that adapter (its LoRA shape must be lora.*'s)."""
    path = cfg.training.reference_adapter
    config, _, _ = read_adapter(path)
    lo = cfg.lora
    if (config.get("r"), float(config.get("lora_alpha", 0))) != (lo.rank, float(lo.alpha)):
        raise QloraConfigError(f"training.reference_adapter {path}: r={config.get('r')} lora_alpha="
                               f"{config.get('lora_alpha')}, but lora.rank={lo.rank} lora.alpha={lo.alpha}: set lora "
                               "to the adapter's shape to start from it")
    load_adapter(model, path, base_fingerprint=fingerprint)
    log.info("qlorakit: the policy starts from %s; a frozen copy of it on the base is the reference", path)


def prepare_pairs(cfg: QloraConfig, tokenizer, cache_dir: Path):
    """Preference records (prompt / chosen / rejected) tokenized as TRL does (or read from the token cache), and
    the held-out pairs."""
    d, t = cfg.data, cfg.training
    train, report, hit = load_pairs(resolve_data_path(d.path), tokenizer, t.max_seq_length, d.max_prompt_length,
                                    cache_dir)
    log.info("qlorakit: %s%s", report.line(), " (tokenized earlier: from the cache)" if hit else "")
    if d.eval_file:
        held, eval_report, hit = load_pairs(resolve_data_path(d.eval_file), tokenizer, t.max_seq_length,
                                            d.max_prompt_length, cache_dir)
        log.info("qlorakit: eval: %s%s", eval_report.line(), " (from the cache)" if hit else "")
    else:
        n_eval = round(len(train) * d.eval_fraction)
        n_eval = min(n_eval, d.max_eval_examples) if d.max_eval_examples else n_eval
        train, held = train.split(n_eval, t.seed) if n_eval else (train, None)
    log.info("qlorakit: objective %s (beta %g): %d training pairs, %d held out; pairs are not packed",
             t.objective, t.beta, len(train), len(held) if held is not None else 0)
    return SimpleNamespace(train=train, eval=held if held is not None and len(held) else None, report=report)
