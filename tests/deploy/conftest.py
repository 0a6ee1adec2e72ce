"""Session fixtures of the deploy tests: the pipeline tests' tiny Llama (bf16, ChatML tokenizer), a sharded copy,
and PEFT adapters with random (nonzero) A and B saved with qlorakit's base-fingerprint record."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))

from deploy_helpers import make_adapter, save_sharded_copy  # noqa: E402
from pipeline_helpers import one_thread, save_tiny_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def single_threaded_module():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("deploy-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def sharded_base(tiny_base, tmp_path_factory) -> Path:
    return save_sharded_copy(tiny_base, tmp_path_factory.mktemp("deploy-llama-sharded"))


@pytest.fixture(scope="session")
def adapter(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter-a") / "adapter", seed=1)


@pytest.fixture(scope="session")
def adapter_b(tiny_base, tmp_path_factory) -> Path:
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter-b") / "adapter", seed=2,
                        targets=["q_proj", "v_proj"])
