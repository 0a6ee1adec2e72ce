"""One rank of a test run under torchrun: `ddp_worker.py CONFIG.yaml [STOP_AFTER_STEPS]`, single-threaded (as
the in-process reference run is, so that both compute every micro-batch with the same kernels)."""

from __future__ import annotations

import logging
import sys

import torch

from qlorakit.config import load_config
from qlorakit.train.run import run_training

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    stop = int(sys.argv[2]) if len(sys.argv) > 2 else None
    run_training(load_config(sys.argv[1]), progress=False, stop_after_steps=stop)
