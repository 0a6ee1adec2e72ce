"""Does a config fit a GPU memory budget, and if not, what would: a plain search with the same estimator.

The budget is compared with the device peak (what NVML shows, estimate.py). The knobs, in this order, from the
ones that leave the training result alone to the ones that change it, each tried from its mildest value:

  training.keep_activations_gib -> 0              same result, slower (every layer recomputed)
  training.gradient_checkpointing -> true         same result, slower
  training.offload_activations -> true            same result: layer inputs wait in pinned host memory
  training.embeddings_on_host -> true, stacked_dequant -> false   same result: the input embedding table in
                                                  pinned host memory, grouped weights dequantized one at a time;
                                                  then also head_on_host (the LM head copied in for each loss)
  training.batch_size halved, gradient_accumulation raised to keep the effective batch: same result
  training.optimizer -> 8-bit states, then offloaded to pinned host memory (32-bit, then 8-bit), then
                        host_adamw_32bit with max_grad_norm null (adapters in the compute dtype on the GPU, master
                        copy and states on the host, stepped inside backward; no gradient clipping)
  training.max_seq_length halved (down to 256)    longer examples are dropped or cut (data.overlong)
  lora.rank halved (down to 4)
  lora.target_modules -> attention only, then q_proj and v_proj

First each knob alone: the mildest value of each that fits is an option. When none fits alone, the knobs are
combined greedily in the order above: a knob takes its mildest value that fits together with the changes made
so far, or its strongest value, and the search goes on to the next knob. When even all of them together do not
fit, the answer says so with the smallest device peak the knobs reach.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import QloraConfig, config_from_dict
from ..errors import QloraConfigError
from .estimate import GiB, Estimate, estimate_shape
from .shapes import ModelShape

Changes = dict[str, Any]  # "section.key" -> value


@dataclass
class Option:
    """Config changes ("section.key" -> value) and the device peak (bytes) they give."""

    changes: Changes
    device_peak: int
    effect: str

    def set_args(self) -> str:
        """The changes as `qlorakit train` options: --set section.key=value ..."""
        return " ".join(f"--set {shlex.quote(f'{k}={_yaml_value(v)}')}" for k, v in self.changes.items())

    def to_json(self) -> dict:
        return {"set": self.changes, "device_peak_gib": round(self.device_peak / GiB, 4), "effect": self.effect}


@dataclass
class Fit:
    """The answer for one budget: `options` (single changes) or `combined` when the config does not fit."""

    budget_gib: float
    estimate: Estimate
    options: list[Option] = field(default_factory=list)
    combined: Option | None = None
    floor: int | None = None  # the smallest device peak the knobs reach, when nothing fits

    @property
    def fits(self) -> bool:
        return self.estimate.device_peak <= self.budget_gib * GiB

    def lines(self) -> list[str]:
        peak = self.estimate.device_peak / GiB
        if self.fits:
            return [f"fits: device peak {peak:.2f} GiB within the {self.budget_gib:g} GiB budget "
                    f"({self.budget_gib - peak:.2f} GiB to spare)"]
        out = [f"does not fit: device peak {peak:.2f} GiB > the {self.budget_gib:g} GiB budget"]
        if self.options:
            out.append("any one of these fits:")
            out += [f"  {o.set_args()}  -> {o.device_peak / GiB:.2f} GiB ({o.effect})" for o in self.options]
        elif self.combined is not None:
            out.append("no single change fits; together these do:")
            out.append(f"  {self.combined.set_args()}  -> {self.combined.device_peak / GiB:.2f} GiB "
                       f"({self.combined.effect})")
        else:
            out.append(f"nothing qlorakit can change fits: with every knob at its strongest the device peak is "
                       f"{(self.floor or 0) / GiB:.2f} GiB; use a larger GPU, or shard the model with "
                       "training.distributed fsdp over several")
        return out

    def to_json(self) -> dict:
        return {"budget_gib": self.budget_gib, "fits": self.fits,
                "device_peak_gib": round(self.estimate.device_peak / GiB, 4),
                "options": [o.to_json() for o in self.options],
                "combined": None if self.combined is None else self.combined.to_json(),
                "floor_gib": None if self.floor is None else round(self.floor / GiB, 4)}


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


Knob = Callable[[QloraConfig, ModelShape], Iterator[tuple[Changes, str]]]


def _keep(cfg: QloraConfig, shape: ModelShape) -> Iterator[tuple[Changes, str]]:
    if cfg.training.keep_activations_gib > 0:
        yield {"training.keep_activations_gib": 0}, "same result, slower: every layer is recomputed"


def _checkpointing(cfg: QloraConfig, shape: ModelShape) -> Iterator[tuple[Changes, str]]:
    if not cfg.training.gradient_checkpointing:
        yield {"training.gradient_checkpointing": True}, "same result, slower: layers are recomputed in backward"


def _offload(cfg: QloraConfig, shape: ModelShape) -> Iterator[tuple[Changes, str]]:
    if not cfg.training.offload_activations:
        yield ({"training.offload_activations": True, "training.gradient_checkpointing": True},
               "same result: recomputed layers' inputs wait in pinned host memory (CUDA)")


def _lean_tables(cfg: QloraConfig, shape: ModelShape) -> Iterator[tuple[Changes, str]]:
    t = cfg.training
    changes: Changes = {}
    if not t.embeddings_on_host and shape.movable_embedding_bytes(2):
        changes["training.embeddings_on_host"] = True
    if t.stacked_dequant:
        changes["training.stacked_dequant"] = False
    if changes:
        yield changes, ("same result: the input embedding table in pinned host memory (CUDA), Q/K/V and gate/up "
                        "weights dequantized one at a time")
    if not t.head_on_host and shape.movable_head_bytes(2):
        yield ({**changes, "training.head_on_host": True},
               "same result: also the LM head in pinned host memory between losses (a copy per micro-batch)")


def _batch(cfg: QloraConfig, shape: ModelShape) -> Iterator[tuple[Changes, str]]:
    t = cfg.training
    for b in range(t.batch_size - 1, 0, -1):
        if t.batch_size % b == 0:
            accumulation = t.gradient_accumulation * (t.batch_size // b)
            yield ({"training.batch_size": b, "training.gradient_accumulation": accumulation},
                   f"same result: the effective batch stays {t.batch_size * t.gradient_accumulation}, steps slower")


_HOST = "host_adamw_32bit"
_OPTIMIZER_STEPS = {
    "paged_adamw_32bit": ["paged_adamw_8bit", "offload_adamw_32bit", "offload_adamw_8bit", _HOST],
    "adamw_32bit": ["adamw_8bit", "offload_adamw_32bit", "offload_adamw_8bit", _HOST],
    "paged_adamw_8bit": ["offload_adamw_8bit", _HOST],
    "adamw_8bit": ["offload_adamw_8bit", _HOST],
    "offload_adamw_32bit": ["offload_adamw_8bit", _HOST],
    "offload_adamw_8bit": [_HOST],
    _HOST: [],
}


def _optimizer(cfg: QloraConfig, shape: ModelShape) -> Iterator[tuple[Changes, str]]:
    for name in _OPTIMIZER_STEPS[cfg.training.optimizer]:
        if name == _HOST:
            yield ({"training.optimizer": name, "training.max_grad_norm": None},
                   "no gradient clipping; otherwise the same result: adapters in the compute dtype on the GPU, fp32 "
                   "master copy and AdamW states in pinned host memory, each adapter stepped inside backward")
            continue
        effect = "8-bit AdamW states: close to 32-bit, not identical" if name.endswith("8bit") else "same result"
        if name.startswith("offload"):
            effect += ", slower steps: states cross PCIe twice per step"
        yield {"training.optimizer": name}, effect


def _seq_length(cfg: QloraConfig, shape: ModelShape) -> Iterator[tuple[Changes, str]]:
    n = cfg.training.max_seq_length // 2
    while n >= 256:
        done = "dropped" if cfg.data.overlong == "drop" else "cut"
        yield {"training.max_seq_length": n}, f"examples longer than {n} tokens are {done} (data.overlong)"
        n //= 2


def _rank(cfg: QloraConfig, shape: ModelShape) -> Iterator[tuple[Changes, str]]:
    r = cfg.lora.rank // 2
    while r >= 4:
        yield {"lora.rank": r}, "a smaller adapter"
        r //= 2


def _targets(cfg: QloraConfig, shape: ModelShape) -> Iterator[tuple[Changes, str]]:
    current = set(shape.adapted(cfg.lora.target_modules))
    for names in (["q_proj", "k_proj", "v_proj", "o_proj"], ["q_proj", "v_proj"]):
        try:
            chosen = set(shape.adapted(names))
        except QloraConfigError:  # the architecture names its projections otherwise
            continue
        if chosen < current:
            yield {"lora.target_modules": names}, f"LoRA on {', '.join(names)} only"


KNOBS: tuple[Knob, ...] = (_keep, _checkpointing, _offload, _lean_tables, _batch, _optimizer, _seq_length, _rank,
                           _targets)


def _apply(cfg: QloraConfig, changes: Changes) -> QloraConfig:
    tree = cfg.model_dump()
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        tree[section][key] = value
    return config_from_dict(tree, "estimate")


def suggest_shape(cfg: QloraConfig, shape: ModelShape, budget_gib: float) -> Fit:
    """suggest() for an already built ModelShape."""
    budget = budget_gib * GiB
    fit = Fit(budget_gib, estimate_shape(cfg, shape))
    if fit.fits:
        return fit

    def peak(changes: Changes) -> int:
        return estimate_shape(_apply(cfg, changes), shape).device_peak

    for knob in KNOBS:
        for changes, effect in knob(cfg, shape):
            p = peak(changes)
            if p <= budget:
                fit.options.append(Option(changes, p, effect))
                break
    if fit.options:
        return fit
    chosen: dict[int, tuple[Changes, str]] = {}  # knob index -> its changes and their effect
    for i, knob in enumerate(KNOBS):
        strongest = None
        for changes, effect in knob(_apply(cfg, _merge(chosen)), shape):
            strongest = (changes, effect)
            if peak(_merge({**chosen, i: strongest})) <= budget:
                fit.combined = _relax(cfg, shape, {**chosen, i: strongest}, peak, budget)
                return fit
        if strongest is not None:
            chosen[i] = strongest
    fit.floor = peak(_merge(chosen))
    return fit


def _merge(chosen: dict[int, tuple[Changes, str]]) -> Changes:
    return {k: v for i in sorted(chosen) for k, v in chosen[i][0].items()}


def _relax(cfg: QloraConfig, shape: ModelShape, chosen: dict[int, tuple[Changes, str]],
           peak: Callable[[Changes], int], budget: float) -> Option:
    """Undo what the greedy pass overdid: each chosen knob, the most result-changing first, goes back to the
    mildest of its values (none at all first) with which the whole combination still fits."""
    for i in sorted(chosen, reverse=True):
        others = {j: c for j, c in chosen.items() if j != i}
        if peak(_merge(others)) <= budget:
            chosen = others
            continue
        for changes, effect in KNOBS[i](_apply(cfg, _merge(others)), shape):
            if peak(_merge({**others, i: (changes, effect)})) <= budget:
                chosen = {**others, i: (changes, effect)}
                break
    changes = _merge(chosen)
    return Option(changes, peak(changes), "; ".join(chosen[i][1] for i in sorted(chosen)))
