"""Test-suite set-up.

TRITON_INTERPRET=1 must be set before any Triton kernel is defined, so that kernels run on CPU tensors in CI.
`--kernel-backend` (or QLORAKIT_KERNELS) picks which implementation the dispatch point uses for the whole run:
`reference` (the default here), `triton` (every dispatched operation through Triton), or `auto`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kernel-backend",
        default=os.environ.get("QLORAKIT_KERNELS", "reference"),
        choices=("reference", "triton", "auto"),
        help="which implementation the kernel dispatch point uses during the tests",
    )


def pytest_configure(config: pytest.Config) -> None:
    os.environ["QLORAKIT_KERNELS"] = config.getoption("--kernel-backend")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_report_header(config: pytest.Config) -> str:
    return f"qlorakit kernel backend: {os.environ['QLORAKIT_KERNELS']} (TRITON_INTERPRET={os.environ['TRITON_INTERPRET']})"
