"""AdamW with 32-bit or blockwise 8-bit states, in GPU, paged (unified) or offloaded (pinned host) memory.

    opt = AdamW(params, lr=2e-4, weight_decay=0.0, state_bits=8, paged=True)

Math: torch.optim.AdamW's (decoupled weight decay, bias-corrected moments, eps outside the square root),
computed in fp32 whatever the parameter dtype (`reference.py` states it exactly). With state_bits=8, parameters
of at least `min_8bit_size` elements keep both moments in 8 bits per element plus one fp32 absmax per
`block_size` elements (`state_8bit.py`); smaller ones keep fp32 moments.

Sharded parameters (DTensors, under FSDP2) are updated shard by shard: each rank keeps states for its own shard
only, and state_dict() holds this rank's shard states.

Memory: all states are allocated together at the first step, one buffer per device and placement (`storage.py`),
for every parameter of the groups (torch.optim.AdamW allocates per parameter when it first has a gradient).
paged=True puts the states of parameters of at least `min_paged_size` elements in CUDA unified memory
(`paged.py`; `prefetch` auto | always | never says when they are prefetched back to the GPU, PrefetchPolicy); paged='pinned' puts them in pinned host memory and streams them through the GPU (`offload.py`);
smaller parameters' states stay in ordinary GPU memory. On a machine without CUDA, paging does nothing and says
so once.

Update: one multi-tensor Triton kernel per parameter dtype and state kind on CUDA (`triton_update.py`), the
plain-PyTorch reference elsewhere; the run's kernels choice (config model.kernels, or the QLORAKIT_KERNELS debugging
switch) set to reference forces the reference, to triton the kernel.

state_dict(): the torch layout {"state": {index: {...}}, "param_groups": [...]}; per parameter "step" (int) and
independent CPU tensors: "exp_avg", "exp_avg_sq" (fp32) or "exp_avg_codes", "exp_avg_sq_codes" (uint8),
"exp_avg_absmax", "exp_avg_sq_absmax" (fp32). Groups carry state_bits, block_size and min_8bit_size, checked on
load; loading copies into the existing buffers, so paged and offloaded states stay where they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .. import logs
from ..kernels.dispatch import requested_backend
from ..sharding import local
from .errors import OptimizerError
from .reference import StepConstants, adamw_update_32bit, adamw_update_8bit
from .storage import KEYS_8BIT, KEYS_32BIT, PLACEMENT_WORDS, Arena, Slot, Work, reset_states

log = logging.getLogger("qlorakit.optim")



def _say_once(key: str, msg: str, *args: Any) -> None:
    logs.say_once(log, key, msg, *args)


def _backend(device: torch.device) -> str:
    """'triton' or 'reference' for tensors on `device`, from the run's kernels choice (auto | reference | triton),
    read as the kernels' dispatch point reads it."""
    choice = requested_backend()
    if choice == "reference" or (choice == "auto" and device.type != "cuda"):
        return "reference"
    try:
        from . import triton_update  # noqa: F401
    except ImportError as err:
        if choice == "triton":
            raise OptimizerError(f"kernels 'triton' was asked for but Triton does not import ({err})") from None
        _say_once("no-triton", "qlorakit: the fused AdamW kernel is unavailable (%s); the optimizer runs the "
                  "PyTorch reference update on %s", err, device)
        return "reference"
    return "triton"


class AdamW(torch.optim.Optimizer):
    """AdamW with 32-bit or 8-bit blockwise states; paged: False, True (unified memory) or 'pinned'."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 state_bits: int = 32, paged: bool | str = False, min_8bit_size: int = 4096,
                 block_size: int = 256, min_paged_size: int = 4096, prefetch: str = "auto"):
        if not lr >= 0.0:
            raise OptimizerError(f"lr {lr!r} must be >= 0")
        if not eps >= 0.0:
            raise OptimizerError(f"eps {eps!r} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise OptimizerError(f"betas {betas!r} must each be in [0, 1)")
        if not weight_decay >= 0.0:
            raise OptimizerError(f"weight_decay {weight_decay!r} must be >= 0")
        if state_bits not in (8, 32):
            raise OptimizerError(f"state_bits {state_bits!r} is not allowed; use 32 or 8")
        if block_size not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise OptimizerError(f"block_size {block_size!r} is not allowed; use a power of two from 64 to 4096")
        if paged not in (False, True, "pinned"):
            raise OptimizerError(f"paged {paged!r} is not allowed; use False, True (unified memory) or 'pinned'")
        if prefetch not in ("auto", "always", "never"):
            raise OptimizerError(f"prefetch {prefetch!r} is not allowed; use 'auto', 'always' or 'never'")
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                        weight_decay=float(weight_decay), state_bits=int(state_bits), block_size=int(block_size),
                        min_8bit_size=int(min_8bit_size))
        super().__init__(params, defaults)
        self.paged = paged
        self.prefetch = prefetch
        self.min_paged_size = int(min_paged_size)
        self._arenas: list[Any] = []
        # id(param) -> (arena, slot index, the param's state dict): one int-keyed lookup per parameter and step
        # (a tensor-keyed dict hashes through Python); the parameters live in param_groups, so ids stay unique.
        self._slot_of: dict[int, tuple[Any, int, dict[str, Any]]] = {}
        self._kernel_cache: dict = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._placement(p)  # says once now, not at the first step, when paging cannot happen

    # --- where each parameter's states go -------------------------------------------------------------------

    def _quantized(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return group["state_bits"] == 8 and local(p).numel() >= group["min_8bit_size"]

    def _placement(self, p: torch.Tensor) -> str:
        if p.device.type != "cuda":
            if self.paged:
                _say_once("paged-no-cuda", "qlorakit: paged optimizer states need CUDA; the parameters are on %s, "
                          "so the states stay in ordinary %s memory", p.device, p.device.type)
            return "cpu" if p.device.type == "cpu" else "device"
        if self.paged and local(p).numel() >= self.min_paged_size:
            return "pinned" if self.paged == "pinned" else "managed"
        return "device"

    def _ensure_states(self) -> None:
        """Allocate zero states, in one buffer per (device, placement), for every parameter that has none."""
        pending: dict[tuple[torch.device, str], list[tuple[dict[str, Any], torch.Tensor]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._slot_of:
                    pending.setdefault((p.device, self._placement(p)), []).append((group, p))
        for (device, placement), members in pending.items():
            slots, offset = [], 0
            for group, p in members:
                slot = Slot.make(local(p).numel(), self._quantized(group, p), group["block_size"], offset)
                slots.append(slot)
                offset += slot.nbytes
            if placement == "pinned":
                from .offload import OffloadArena

                arena: Any = OffloadArena(device, slots)
            else:
                arena = Arena(placement, device, slots, prefetch_mode=self.prefetch)
            self._arenas.append(arena)
            for i, (_, p) in enumerate(members):
                self.state[p] = {"step": 0, **arena.views[i]}
                self._slot_of[id(p)] = (arena, i, self.state[p])
            log.info("qlorakit: optimizer states for %d tensors: %.3f GiB in %s", len(members),
                     arena.nbytes / 2**30, PLACEMENT_WORDS[placement])

    # --- the update ------------------------------------------------------------------------------------------

    def _apply(self, items: list) -> None:
        if not items:
            return
        device = items[0].param.device
        if _backend(device) == "triton":
            from .triton_update import kernel_accepts, launch_updates

            fast, slow = [], []
            for it in items:
                (fast if kernel_accepts(it) else slow).append(it)
            for it in slow:
                _say_once(f"ref-{it.param.dtype}-{it.param.is_contiguous()}-{it.block_size}",
                          "qlorakit: a parameter of shape %s, dtype %s, contiguous=%s is updated by the PyTorch "
                          "reference (the fused kernel takes contiguous fp32/bf16/fp16 tensors)",
                          tuple(it.param.shape), it.param.dtype, it.param.is_contiguous())
            launch_updates(fast, self._kernel_cache)
            items = slow
        for it in items:
            if it.quantized:
                m_codes, v_codes, m_absmax, v_absmax = it.states
                adamw_update_8bit(it.param, it.grad, m_codes, m_absmax, v_codes, v_absmax, it.constants,
                                  it.block_size)
            else:
                adamw_update_32bit(it.param, it.grad, it.states[0], it.states[1], it.constants)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_states()
        work: dict[int, list[Work]] = {}
        for group in self.param_groups:
            lr, betas, eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
            constants: dict[int, StepConstants] = {}  # by step count: usually one per group
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise OptimizerError("qlorakit AdamW does not support sparse gradients")
                arena, idx, st = self._slot_of[id(p)]
                st["step"] += 1
                c = constants.get(st["step"])
                if c is None:
                    c = constants[st["step"]] = StepConstants.for_step(lr, betas, eps, wd, st["step"])
                # A sharded (FSDP2) parameter is updated through its local shard, with the shard of its gradient.
                work.setdefault(id(arena), []).append(Work(idx, local(p), local(p.grad), c))
        for arena in self._arenas:
            if id(arena) in work:
                arena.update(work[id(arena)], self._apply)
        return loss

    # --- what it holds ---------------------------------------------------------------------------------------

    @property
    def arenas(self) -> list[Any]:
        """The state buffers (`storage.Arena`, `offload.OffloadArena`), for inspection and measurements."""
        return list(self._arenas)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state by placement (allocated at the first step; 0 before)."""
        out: dict[str, int] = {}
        for arena in self._arenas:
            out[arena.placement] = out.get(arena.placement, 0) + arena.state_bytes()
        return out

    def describe(self) -> str:
        """One line: state format and where the states live (or will live)."""
        groups = self.param_groups
        bits = sorted({g["state_bits"] for g in groups})
        fmt = " and ".join(
            f"8-bit blockwise states (blocks of {groups[0]['block_size']}, fp32 for tensors under "
            f"{groups[0]['min_8bit_size']} elements)" if b == 8 else "32-bit states" for b in bits)
        places = sorted({self._placement(p) for g in groups for p in g["params"]})
        where = "; ".join(PLACEMENT_WORDS[pl] for pl in places) or "nowhere (no parameters)"
        return f"AdamW with {fmt}; states in {where}"

    # --- checkpoints -----------------------------------------------------------------------------------------

    def _index(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _synchronize(self) -> None:
        for arena in self._arenas:
            arena.synchronize()

    def state_dict(self) -> dict[str, Any]:
        self._synchronize()
        groups, start = [], 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        state: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(self._index()):
            st = self.state.get(p)
            if not st or st["step"] == 0:
                continue
            state[i] = {k: (v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise OptimizerError(
                "the saved optimizer state has groups of sizes "
                f"{[len(s['params']) for s in saved_groups]}, this optimizer "
                f"{[len(g['params']) for g in self.param_groups]}: it was saved for other parameters")
        for saved, group in zip(saved_groups, self.param_groups):
            for key in ("state_bits", "block_size", "min_8bit_size"):
                if key in saved and saved[key] != group[key]:
                    raise OptimizerError(
                        f"the saved optimizer state has {key}={saved[key]}, this optimizer {key}={group[key]}; "
                        "build the optimizer with the settings of the run that saved it (the same optimizer name)")
        self._ensure_states()
        self._synchronize()
        saved_state = {int(k): v for k, v in state_dict["state"].items()}
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value
        for i, p in enumerate(self._index()):
            arena, idx, st = self._slot_of[id(p)]
            slot = arena.slots[idx]
            entry = saved_state.get(i)
            if entry is None:
                reset_states(slot, arena.views[idx])
                st["step"] = 0
                continue
            keys = KEYS_8BIT if slot.quantized else KEYS_32BIT
            missing = [k for k in keys if k not in entry]
            if missing:
                kind = "8-bit" if slot.quantized else "32-bit"
                raise OptimizerError(f"saved state of parameter {i} (shape {tuple(p.shape)}) lacks {missing}; this "
                                     f"optimizer keeps {kind} states for it (keys {list(keys)})")
            for k in keys:
                value = entry[k]
                if not isinstance(value, torch.Tensor) or value.numel() != st[k].numel() or (
                        value.dtype != st[k].dtype and slot.quantized):
                    got = (f"{value.dtype} x {value.numel()}" if isinstance(value, torch.Tensor)
                           else type(value).__name__)
                    raise OptimizerError(f"saved state {k!r} of parameter {i} does not fit: got {got}, need "
                                         f"{st[k].dtype} x {st[k].numel()}")
                st[k].copy_(value.reshape(-1))
            step = entry["step"]
            st["step"] = int(step.item() if isinstance(step, torch.Tensor) else step)
