"""What the inputs of each LoRA-targeted linear look like on calibration tokens, for the calibrated LoftQ init.

lora.init loftq with calibration (model/loftq_init.py) weights each layer's quantization error by its inputs. With
X [n, in_features] the inputs the layer receives over the n calibration tokens (fp32), the statistic is

    kind "gram":     G = X^T X / n           fp32 [in_features, in_features]
    kind "diagonal": g = mean_t X[t]^2       fp32 [in_features], the diagonal of G

The model runs in eval mode with its adapters off (nn/lora.adapters_disabled), so X is what the 4-bit base feeds
the layer: the inputs training starts from, and the same whatever order the layers are initialised in. Each token
sequence runs alone (batch 1: no padding, no KV cache, no logits but the last position's), so every position is a
real token of the training data.

Memory: linears handed the very same input tensor (q/k/v and gate/up in transformers' Llama; found by one forward
over a few tokens) share one statistic. The Grams of a group of linears whose statistics fit `max_bytes` (at
least one statistic) are summed in one pass over the sequences, on the layer's device; the pass stops the forward
right after its last linear has been called, and its statistics are handed out one linear at a time, so that each
is freed once its layer is initialised. The bundled 135M model's Grams (0.4 GB) fit one pass; Llama-2-70B's
down_proj Gram alone is 28672^2 x 4 bytes = 3.3 GB: its passes hold one or two Grams, at the cost of a (partial)
forward over the calibration tokens per pass. The diagonal statistics (in_features floats each) always fit one pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from ..nn.lora import adapters_disabled

StatisticKind = Literal["gram", "diagonal"]
PROBE_TOKENS = 8  # the forward that finds the call order and shared inputs


class _PassDone(Exception):
    """Raised from a hook once the pass's last linear has its inputs: the rest of the forward is not needed."""


def _forward(model: nn.Module, ids: torch.Tensor) -> None:
    device = model.get_input_embeddings().weight.device
    try:
        model(input_ids=ids[None].to(device), use_cache=False, logits_to_keep=1)
    except _PassDone:
        pass


def _discover(model: nn.Module, names: list[str], probe: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    """(the linears `names` in the order of the forward's calls, one entry a call, and each called one's owner:
    the first linear called with the very same input tensor)."""
    events: list[str] = []
    owner: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []

    def hook_of(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            events.append(name)
            if name not in owner:
                owner[name] = next((first for x, first in seen if x is args[0]), name)
                if owner[name] == name:
                    seen.append((args[0], name))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_of(n)) for n in names]
    try:
        _forward(model, probe)
    finally:
        for handle in handles:
            handle.remove()
    return events, owner


def _passes(owner: dict[str, str], nbytes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """The called linears (`owner`'s keys, in call order) cut into passes whose owners' statistics add up to at
    most max_bytes (a pass holds at least one owner); a linear goes with its owner."""
    passes: list[list[str]] = []
    where: dict[str, int] = {}
    held = 0
    for name, first in owner.items():
        if first == name:
            if passes and held + nbytes[name] <= max_bytes:
                held += nbytes[name]
            else:
                passes.append([])
                held = nbytes[name]
            where[name] = len(passes) - 1
        passes[where[first]].append(name)
    return passes


def _stop_point(events: list[str], group: list[str]) -> tuple[str, int]:
    """(the linear of the group the forward calls last, and how many calls it has had by then)."""
    i = max(k for k, name in enumerate(events) if name in group)
    return events[i], events[:i + 1].count(events[i])


def _new_statistic(layer: nn.Module, kind: StatisticKind) -> torch.Tensor:
    shape = (layer.in_features,) * (2 if kind == "gram" else 1)
    return torch.zeros(shape, dtype=torch.float32, device=layer.lora_A.weight.device)


@torch.no_grad()
def input_statistics(model: nn.Module, names: list[str], sequences: list[torch.Tensor], kind: StatisticKind,
                     max_bytes: int = 2 ** 31) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, statistic) for each LoraLinear `names` of `model` that the forward calls: the mean over the
    tokens of `sequences` (int64 [L] token ids each, L >= 1) of x x^T (kind gram, fp32 [in, in]) or of x^2 (kind
    diagonal, fp32 [in]), x the layer's input at that token (module docstring). Linears sharing an input share
    the yielded tensor; a linear called several times in a forward adds every call's inputs. A linear the forward
    never calls is not yielded."""
    if not sequences or not all(len(s) for s in sequences):
        raise ValueError("input_statistics needs one or more token sequences, none of them empty")
    layers = {n: model.get_submodule(n) for n in names}
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            events, owner = _discover(model, names, sequences[0][:PROBE_TOKENS])
            nbytes = {n: 4 * layers[n].in_features ** (2 if kind == "gram" else 1) for n in owner}
            for group in _passes(owner, nbytes, max_bytes):
                yield from _one_pass(model, layers, group, owner, _stop_point(events, group), sequences, kind)
    finally:
        model.train(was_training)


def _one_pass(model: nn.Module, layers: dict[str, nn.Module], group: list[str], owner: dict[str, str],
              stop: tuple[str, int], sequences: list[torch.Tensor], kind: StatisticKind
              ) -> Iterator[tuple[str, torch.Tensor]]:
    sums = {n: _new_statistic(layers[n], kind) for n in group if owner[n] == n}
    tokens = dict.fromkeys(sums, 0)
    called: Counter = Counter()

    def hook_of(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name in sums:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                if kind == "gram":
                    sums[name].addmm_(x.t(), x)
                else:
                    sums[name].add_(x.square().sum(0))
                tokens[name] += x.shape[0]
            called[name] += 1
            if (name, called[name]) == stop:
                raise _PassDone
        return hook

    handles = [layers[n].register_forward_pre_hook(hook_of(n)) for n in group]
    try:
        for ids in sequences:
            called.clear()
            _forward(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    for name, total in sums.items():
        total.div_(max(tokens[name], 1))
    handed = {n: sums[owner[n]] for n in group}
    sums.clear()  # the tensors live on in `handed` only, each until its linear is handed out
    while handed:
        name = next(iter(handed))
        yield name, handed.pop(name)
