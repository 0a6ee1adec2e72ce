"""training.memory_budget_gib: the fastest activation plan whose estimated device peak fits the budget, chosen
before the model loads.

Only choices that leave the result alone are made: gradient checkpointing on, the inputs of recomputed layers
offloaded to pinned host memory (on a CUDA device), when that is not enough the input embedding table in pinned
host memory and grouped weights dequantized one at a time (training.embeddings_on_host, stacked_dequant), then
the LM head in host memory between losses (head_on_host: a copy per micro-batch), the optimizer states in
pinned host memory (offload_adamw_*: the same AdamW), smaller micro-batches with more accumulation (the same
effective batch), and as many layers as fit keeping their activations for backward
(training.keep_activations_gib: no recompute for them, the fastest way to spend memory). When even the leanest of
these does not fit, the run is refused before anything loads, with what would fit (suggest.py: 8-bit states,
host_adamw_32bit without clipping, shorter sequences, a lower rank, fewer modules).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import QloraConfig
from ..errors import QloraConfigError
from ..model.fused_blocks import layer_activation_bytes
from .estimate import GiB, Estimate, estimate_shape
from .shapes import ModelShape, dtype_bytes
from .suggest import _apply, suggest_shape

# The same AdamW with its states in pinned host memory, streamed through the GPU for the update: the planner's
# last result-preserving placement (host_adamw_32bit is not: it cannot clip; suggest.py offers it).
_PINNED = {"paged_adamw_32bit": "offload_adamw_32bit", "adamw_32bit": "offload_adamw_32bit",
           "paged_adamw_8bit": "offload_adamw_8bit", "adamw_8bit": "offload_adamw_8bit"}


# What a run may plan for when it names no training.memory_budget_gib (CUDA): the card's free memory, less 5% and
# 0.5 GiB for what the estimate leaves out (it was within 2% of torch's peak and 10% of NVML's on the H100 grid).
FREE_MARGIN = 0.05
FREE_MARGIN_BYTES = 512 * 2**20
# The share of the host's available memory the plan may pin for activations (training.host_activations_gib).
HOST_SHARE = 0.5
# The keys the planner sets: a config that sets any of them itself is run as written, not planned by default.
PLANNED_KEYS = frozenset({"keep_activations_gib", "host_activations_gib", "offload_activations",
                          "gradient_checkpointing", "embeddings_on_host", "head_on_host", "stacked_dequant",
                          "optimizer", "batch_size", "gradient_accumulation"})


def default_budget_gib(free_bytes: int) -> float:
    """training.memory_budget_gib's default on a GPU with `free_bytes` free (torch.cuda.mem_get_info)."""
    return max(0.0, (free_bytes * (1 - FREE_MARGIN) - FREE_MARGIN_BYTES) / GiB)


@dataclass
class MemoryPlan:
    config: QloraConfig  # the run's config with the plan's choices in it
    estimate: Estimate
    budget_gib: float
    changes: dict

    def line(self) -> str:
        t = self.config.training
        chose = ", ".join(f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                          for k, v in self.changes.items()) or "the config as it is"
        return (f"qlorakit: memory plan for training.memory_budget_gib={self.budget_gib:g}: {chose}; estimated "
                f"peak {self.estimate.torch_peak / GiB:.2f} GiB torch, {self.estimate.device_peak / GiB:.2f} GiB "
                f"device-wide ({t.batch_size} x {t.max_seq_length} tokens per micro-batch; "
                f"`qlorakit estimate` shows the breakdown)")


def host_available_bytes() -> int:
    """The host memory the kernel says is available (MemAvailable), or 0 where it cannot be read."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _hostable_gib(cfg: QloraConfig, shape: ModelShape, lean: dict, host_free: int) -> float:
    """training.host_activations_gib for as many fused layers as HOST_SHARE of the available host memory holds
    beside what the plan already puts there (every fused layer at most); 0 when none fit."""
    every = estimate_shape(_apply(cfg, {**lean, "training.host_activations_gib": 4096.0}), shape)
    hosted = next((c.nbytes for c in every.host if c.key == "offloaded_activations"), 0)
    others = sum(c.nbytes for c in every.host if c.key not in ("offloaded_activations", "loading"))
    fused = shape.fusable_layers(shape.adapted(cfg.lora.target_modules))["layer"]
    if hosted <= 0 or not fused:
        return 0.0
    fit = min(fused, int((HOST_SHARE * host_free - others) // (hosted / fused)))
    t = cfg.training
    small = layer_activation_bytes(shape.config, t.batch_size * t.max_seq_length,
                                   dtype_bytes(cfg.quantization.compute_dtype))[0]
    return round((fit * small + small // 2) / GiB, 6) if fit > 0 else 0.0


def plan_memory(cfg: QloraConfig, shape: ModelShape, budget_gib: float, cuda: bool,
                host_free: int | None = None, torch_budget_gib: float | None = None) -> MemoryPlan:
    """The plan for `cfg` within `budget_gib` GiB (device peak); QloraConfigError, with what would fit, when
    nothing that keeps the result does. `host_free`: host memory available for pinned activations (default:
    MemAvailable). `torch_budget_gib`: also keep the estimated torch peak (what torch.cuda.max_memory_allocated
    counts) within it, as when matching another tool measured by that counter (benchmarks/train_step.py)."""
    budget = budget_gib * GiB
    torch_budget = None if torch_budget_gib is None else torch_budget_gib * GiB

    def over_budget(changes: dict) -> bool:
        est = estimate_shape(_apply(cfg, changes), shape)
        return est.device_peak > budget or (torch_budget is not None and est.torch_peak > torch_budget)

    lean = {"training.gradient_checkpointing": True, "training.keep_activations_gib": 0.0,
            "training.host_activations_gib": 0.0}
    if cuda:
        lean["training.offload_activations"] = True

    def over_with(keep_gib: float) -> bool:
        return over_budget({**lean, "training.keep_activations_gib": keep_gib})

    def lean_tables(base: dict) -> dict:
        """`base` with the placements that change no number added while the lean peak is over the budget."""
        lean = dict(base)
        if not cuda:
            return lean
        over = lambda: over_budget(lean)  # noqa: E731
        if over():  # the tables: embeddings and the workspace
            lean["training.stacked_dequant"] = False
            if shape.movable_embedding_bytes(2):
                lean["training.embeddings_on_host"] = True
        if over() and shape.movable_head_bytes(2):  # costs a copy of the head per micro-batch
            lean["training.head_on_host"] = True
        if over() and cfg.training.optimizer in _PINNED:  # the same AdamW, its states in pinned host memory
            lean["training.optimizer"] = _PINNED[cfg.training.optimizer]
        return lean

    # Layers kept in host memory run nearly as fast as kept ones (the copies overlap the compute) and far faster
    # than recomputed ones: worth moving the tables for. Without room for them, the layers are recomputed.
    host_gib = _hostable_gib(cfg, shape, lean, host_available_bytes() if host_free is None else host_free) \
        if cuda else 0.0
    hosted = lean_tables({**lean, "training.host_activations_gib": host_gib}) if host_gib else None
    lean = hosted if hosted is not None and not over_budget(hosted) else lean_tables(lean)
    b, acc = cfg.training.batch_size, cfg.training.gradient_accumulation
    while over_with(0.0) and b > 1:  # smaller micro-batches, more of them: the same effective batch
        b = max(d for d in range(1, b) if cfg.training.batch_size % d == 0)
        lean["training.batch_size"] = b
        lean["training.gradient_accumulation"] = acc * (cfg.training.batch_size // b)
    if over_with(0.0):
        fit = suggest_shape(_apply(cfg, lean), shape, budget_gib)
        ways = [f"{o.set_args()} ({o.device_peak / GiB:.2f} GiB; {o.effect})" for o in fit.options]
        if fit.combined is not None:
            ways.append(f"{fit.combined.set_args()} ({fit.combined.device_peak / GiB:.2f} GiB)")
        floor = f" (the least any change reaches is {fit.floor / GiB:.2f} GiB)" if fit.floor else ""
        hint = "; or ".join(ways) if ways else f"nothing qlorakit can change fits{floor}: a larger GPU is needed"
        also = [words for key, words in (
            ("training.embeddings_on_host", "the input embeddings in host memory"),
            ("training.head_on_host", "the LM head in host memory"),
            ("training.stacked_dequant", "weights dequantized one at a time"),
            ("training.optimizer", f"optimizer {lean.get('training.optimizer')}"),
            ("training.batch_size", f"micro-batches of {lean.get('training.batch_size')} x "
                                    f"{lean.get('training.gradient_accumulation')} accumulated")) if key in lean]
        torch_part = "" if torch_budget_gib is None else \
            f" (torch peak {fit.estimate.torch_peak / GiB:.2f} GiB against {torch_budget_gib:g})"
        raise QloraConfigError(
            f"training.memory_budget_gib={budget_gib:g}: even with every layer recomputed"
            f"{' and its input offloaded' if cuda else ''}{''.join(', ' + w for w in also)}, the estimated device "
            f"peak is {fit.estimate.device_peak / GiB:.2f} GiB{torch_part}; what would fit: {hint}")
    # Kept activations grow with keep_activations_gib in steps of one layer; bisect to within 1/64 GiB.
    lo, hi = 0.0, 1.0
    while not over_with(hi) and hi < 4096:
        lo, hi = hi, hi * 2
    while hi - lo > 1 / 64:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if over_with(mid) else (mid, hi)
    changes = {k: v for k, v in {**lean, "training.keep_activations_gib": round(lo, 4)}.items()
               if getattr(cfg.training, k.split(".", 1)[1]) != v}
    planned = _apply(cfg, changes)
    return MemoryPlan(planned, estimate_shape(planned, shape), budget_gib, changes)
