"""Will it fit? Peak GPU and host memory of a training config, from config.json alone (no weights, no GPU).

    est = estimate(load_config("run.yaml"), model_dir)
    print(est.table()); json.dumps(est.to_json())
    fit = suggest(cfg, model_dir, budget_gib=24)

The memory model and every assumption: estimate.py's docstring; exact tensor sizes: shapes.py; the budget
search: suggest.py.
"""

from __future__ import annotations

from pathlib import Path

from ..config import QloraConfig
from .estimate import Component, Estimate, Method, estimate_shape
from .plan import MemoryPlan, plan_memory
from .shapes import ModelShape
from .suggest import Fit, Option, suggest_shape


def estimate(cfg: QloraConfig, model_dir: str | Path) -> Estimate:
    """Peak memory of training `cfg` on the model in `model_dir` (its config.json only)."""
    return estimate_shape(cfg, ModelShape(model_dir))


def plan(cfg: QloraConfig, model_dir: str | Path, budget_gib: float, cuda: bool = True,
         host_free: int | None = None, torch_budget_gib: float | None = None) -> MemoryPlan:
    """The activation plan (checkpointing, kept / hosted / recomputed layers, offloaded inputs, host tables)
    that fits `budget_gib` GiB fastest; `host_free`: host memory it may pin from (default: what is available);
    `torch_budget_gib`: a bound on the torch-counted peak as well."""
    return plan_memory(cfg, ModelShape(model_dir), budget_gib, cuda, host_free, torch_budget_gib)


def suggest(cfg: QloraConfig, model_dir: str | Path, budget_gib: float) -> Fit:
    """Whether `cfg` fits in `budget_gib` GiB of GPU memory (device peak), and if not, which changes would."""
    return suggest_shape(cfg, ModelShape(model_dir), budget_gib)


__all__ = ["Component", "Estimate", "Fit", "MemoryPlan", "Method", "ModelShape", "Option", "estimate", "plan",
           "suggest"]
