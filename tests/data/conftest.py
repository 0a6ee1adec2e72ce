"""Fixtures of the data-layer tests: the two tiny tokenizers, built once per session."""

from __future__ import annotations

import pytest
from datahelpers import make_chatml_tokenizer, make_plain_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    return make_chatml_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    return make_plain_tokenizer()
