"""What data preparation did, counted, and said in one line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenizeStats:
    """One file's tokenisation: records read, examples kept, and what happened to the others."""

    records: int
    examples: int
    empty: int = 0
    """records with nothing to learn (empty output, text, or assistant replies), skipped"""
    dropped: int = 0
    """examples longer than max_seq_length that were dropped (or, truncated, kept no target token)"""
    truncated: int = 0
    """examples longer than max_seq_length cut to it (overlong='truncate')"""
    split_texts: int = 0
    """texts longer than max_seq_length split into chunks"""
    chunks: int = 0
    """examples those texts became"""
    longest: int = 0
    """tokens in the longest example before dropping or truncating"""

    def describe(self, max_seq_length: int) -> str:
        parts = [f"{self.records} records -> {self.examples} examples"]
        if self.empty:
            parts.append(f"{self.empty} with nothing to learn skipped")
        if self.dropped:
            parts.append(f"{self.dropped} longer than max_seq_length {max_seq_length} dropped "
                         f"(longest {self.longest} tokens)")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_seq_length {max_seq_length}")
        if self.split_texts:
            parts.append(f"{self.split_texts} texts longer than max_seq_length split into {self.chunks} chunks")
        return ", ".join(parts)


@dataclass(frozen=True)
class DataReport:
    path: str
    fmt: str
    template: str
    max_seq_length: int
    train_file: TokenizeStats
    eval_file: TokenizeStats | None
    """the eval file's tokenisation when one was given; None when eval was split off the training file"""
    train_examples: int
    eval_examples: int
    train_tokens: int
    train_target_tokens: int
    cache_hit: bool
    """every file involved came from the cache"""

    def summary(self) -> str:
        """One line for the log."""
        template = "" if self.template == "none" else f", template {self.template}"
        line = (f"data {self.path} ({self.fmt}{template}): {self.train_file.describe(self.max_seq_length)}; "
                f"{self.train_examples} train / {self.eval_examples} eval examples, {self.train_tokens} train "
                f"tokens of which {self.train_target_tokens} carry loss")
        if self.eval_file is not None:
            line += f"; eval file: {self.eval_file.describe(self.max_seq_length)}"
        return line + ("; from cache" if self.cache_hit else "")
