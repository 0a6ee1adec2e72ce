#!/usr/bin/env python3
"""Benchmark and GPU self-check of qlorakit's optimizers (CUDA only).

    python3 benchmarks/optim.py --out DIR

On the Llama-3-8B adapter shapes at r=64, all linears (hidden 4096, intermediate 14336, 32 layers, k/v out 1024:
448 fp32 tensors, 167,772,160 parameters; fake parameters and gradients, no base model), in one process:
  1. correctness on this GPU, printed PASS/FAIL (exit 1 on any FAIL): the fused kernel against the plain-PyTorch
     reference (bit equality, 8-bit and 32-bit, fp32 and bf16 parameters, uneven sizes); 32-bit AdamW against
     torch.optim.AdamW; device, paged and pinned placements giving bit-identical parameters; paged buffers
     being managed memory outside torch's allocator, pinned ones host memory; a paged 8-bit state_dict round
     trip giving identical next steps; a deleted paged optimizer returning its managed memory;
  2. optimizer-state bytes, 32-bit and 8-bit;
  3. optimizer step time (wall clock, synchronized, median) with states in torch memory, in managed memory
     (nothing evicted), and in pinned host memory; then paged states that were moved to host memory first
     (cudaMemPrefetchAsync to the CPU: what the driver does when it evicts, without making memory pressure)
     brought back by the optimizer's prefetch, and by page faults with the prefetch switched off;
  4. peaks per placement: torch-counted (max_memory_allocated) and device-wide (NVML, sampled every ~1 ms),
     both as increments over the state before the optimizer existed;
  5. a run under a torch memory cap (torch.cuda.set_per_process_memory_fraction): a small stack of LoRA MLP
     blocks on a long sequence, with the cap set between the measured peaks with and without torch-held states:
     torch-held 32-bit states run out of memory, paged and offloaded ones complete (and torch-held 8-bit ones,
     4x smaller, are shown too). A cap shows that the states left the allocator's budget, not that the driver
     paged: nothing here creates memory pressure on the card.
Prints a short table last and writes every number to DIR/optim.json.

Safety on a shared card: it refuses to start unless 16 GiB are free, allocates at most ~10 GiB, asks for
managed memory only through qlorakit.optim.paged (which checks free memory first) and never allocates to force
eviction. It sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (unless set, or --allocator-default is given)
so that torch's reserved memory tracks its allocated memory and the cap separates the cases by the states, not
by fragmentation.
"""

from __future__ import annotations

import os
import sys

if "--allocator-default" not in sys.argv:  # must be set before torch initialises CUDA
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from bench_common import Run, sh  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qlorakit.optim import AdamW  # noqa: E402
from qlorakit.optim.paged import FREE_MEMORY_MARGIN, managed_bytes_live, memory_kind, prefetch  # noqa: E402
from qlorakit.optim.reference import StepConstants, UpdateItem, adamw_update_8bit, adamw_update_32bit  # noqa: E402
from qlorakit.optim.state_8bit import quantize_state, state_maps  # noqa: E402

HIDDEN, INTER, KV, LAYERS, RANK = 4096, 14336, 1024, 32, 64
MODULES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
           "gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}  # (in, out)
NEED_FREE = 16 * 2**30
QLORA_STEP_S = 2048 / 3942  # DESIGN.md anchor: QLoRA step, Llama-3-8B shape, r=64, B1 x T2048, bnb 0.50.2
PLACEMENTS = {"device": False, "managed": True, "pinned": "pinned"}
GIB = 2**30


def release() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


class Nvml:
    """Device-wide used memory (all processes) of the torch device; `sample_during` polls it from a thread."""

    def __init__(self, device: torch.device):
        self.ok, self.error, self.handle = False, "", None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            try:
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid else None
            except Exception:  # noqa: BLE001 - fall back to the index
                self.handle = None
            if self.handle is None:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.used()
            self.ok = True
        except Exception as err:  # noqa: BLE001
            self.error = f"{type(err).__name__}: {err}"

    def used(self) -> int:
        return int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).used)

    def sample_during(self, fn):
        """(result of fn(), peak used bytes seen while it ran)."""
        if not self.ok:
            return fn(), None
        peak = [self.used()]
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                peak[0] = max(peak[0], self.used())
                time.sleep(0.001)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            out = fn()
            torch.cuda.synchronize()
        finally:
            stop.set()
            t.join()
        peak[0] = max(peak[0], self.used())
        return out, peak[0]


# --- the Llama-3-8B adapter shapes -------------------------------------------------------------------------

def adapter_params(device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _ in range(LAYERS):
        for fan_in, fan_out in MODULES.values():
            params.append(torch.nn.Parameter(torch.randn(RANK, fan_in, device=device, generator=g) * 0.01))
            params.append(torch.nn.Parameter(torch.randn(fan_out, RANK, device=device, generator=g) * 0.01))
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=g) * 1e-3
    return params


def bytes_of(opt: AdamW) -> int:
    return sum(opt.state_bytes().values())


def timed_steps(opt: AdamW, n: int) -> list[float]:
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def managed_arena(opt: AdamW):
    return next(a for a in opt.arenas if a.placement == "managed")


# --- 1. correctness ------------------------------------------------------------------------------------------

def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def kernel_checks(run: Run, device: torch.device) -> None:
    from qlorakit.optim.triton_update import launch_updates

    g = torch.Generator(device=device).manual_seed(1)
    maps = state_maps(device)
    for quantized in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            items, expected = [], []
            cases = ((RANK * HIDDEN, 0.0, 1), (RANK * INTER + 300, 0.01, 10), (1000, 0.1, 1000), (1, 0.0, 2))
            for n, wd, step in cases:
                p = torch.randn(n, device=device, generator=g).to(dtype)
                grad = (torch.randn(n, device=device, generator=g) * 1e-3).to(dtype)
                m = torch.randn(n, device=device, generator=g) * 1e-4
                v = torch.rand(n, device=device, generator=g) * 1e-7
                if n > 600:
                    m[256:512], v[256:512] = 0, 0
                if quantized:
                    qm, am = quantize_state(m, maps.signed, maps.signed_mid, 256)
                    qv, av = quantize_state(v, maps.unsigned, maps.unsigned_mid, 256)
                    states = (qm, qv, am, av)
                else:
                    states = (m, v)
                c = StepConstants.for_step(2e-4, (0.9, 0.999), 1e-8, wd, step)
                items.append(UpdateItem(p, grad, states, c, quantized, 256))
                expected.append(UpdateItem(p.clone(), grad, tuple(s.clone() for s in states), c, quantized, 256))
            for it in expected:
                if quantized:
                    adamw_update_8bit(it.param, it.grad, it.states[0], it.states[2], it.states[1], it.states[3],
                                      it.constants, 256)
                else:
                    adamw_update_32bit(it.param, it.grad, it.states[0], it.states[1], it.constants)
            launch_updates(items, {})
            torch.cuda.synchronize()
            bad, total = 0, 0
            for got, want in zip(items, expected):
                for a, b in zip((got.param, *got.states), (want.param, *want.states)):
                    bad += int((bits(a) != bits(b)).sum())
                    total += a.numel()
            kind = "8-bit" if quantized else "32-bit"
            run.check(f"fused kernel == reference, {kind} states, {str(dtype).removeprefix('torch.')} params",
                      bad == 0, f"{bad} of {total} values differ")


def torch_adamw_check(run: Run, device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(2)
    ours = [torch.nn.Parameter(torch.randn(s, device=device, generator=g)) for s in ((64, 4096), (1024, 64), (37,))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = AdamW(ours, lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01)
    worst = 0.0
    for _ in range(10):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, device=device, generator=g) * 1e-2
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    run.check("32-bit AdamW == torch.optim.AdamW over 10 steps (fp32 rounding)", worst < 1e-5,
              f"max difference {worst:.2e} of the largest parameter")


def placement_checks(run: Run, device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(3)
    shapes = [(RANK, HIDDEN)] * 4 + [(INTER, RANK)] * 2 + [(100,), (3000,)]
    base = [torch.randn(s, device=device, generator=g) * 0.01 for s in shapes]
    grads = [[torch.randn(s, device=device, generator=g) * 1e-3 for s in shapes] for _ in range(5)]
    for state_bits in (32, 8):
        finals = {}
        for placement, paged in PLACEMENTS.items():
            params = [torch.nn.Parameter(b.clone()) for b in base]
            allocated = torch.cuda.memory_allocated(device)
            opt = AdamW(params, lr=1e-3, weight_decay=0.01, state_bits=state_bits, paged=paged)
            for step_grads in grads:
                for p, gr in zip(params, step_grads):
                    p.grad = gr
                opt.step()
            torch.cuda.synchronize()
            grew = torch.cuda.memory_allocated(device) - allocated
            if placement == "managed":
                arena = managed_arena(opt)
                run.check(f"paged {state_bits}-bit states are managed memory, outside torch's allocator",
                          memory_kind(arena.buffer) == "managed" and grew < arena.nbytes // 4,
                          f"kind {memory_kind(arena.buffer)}, torch allocated +{grew / 2**20:.1f} MiB for "
                          f"{arena.nbytes / 2**20:.1f} MiB of managed states")
            if placement == "pinned":
                arena = next(a for a in opt.arenas if a.placement == "pinned")
                run.check(f"offloaded {state_bits}-bit states are pinned host memory",
                          memory_kind(arena.buffer) == "host" and not arena.buffer.is_cuda,
                          f"kind {memory_kind(arena.buffer)}")
            finals[placement] = [p.detach().clone() for p in params]
            del opt, params
            release()
        same = all(torch.equal(a, b) for pl in ("managed", "pinned") for a, b in zip(finals["device"], finals[pl]))
        run.check(f"{state_bits}-bit: device, paged and pinned states give bit-identical parameters", same)


def checkpoint_and_free_checks(run: Run, device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(4)
    shapes = [(RANK, HIDDEN), (INTER, RANK), (700,)]
    live_before = managed_bytes_live()
    a = [torch.nn.Parameter(torch.randn(s, device=device, generator=g)) for s in shapes]
    opt = AdamW(a, lr=1e-3, state_bits=8, paged=True)
    grads = [[torch.randn(s, device=device, generator=g) * 1e-3 for s in shapes] for _ in range(6)]
    for step_grads in grads[:3]:
        for p, gr in zip(a, step_grads):
            p.grad = gr
        opt.step()
    sd = opt.state_dict()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    resumed = AdamW(b, lr=1e-3, state_bits=8, paged=True)
    resumed.load_state_dict(sd)
    for step_grads in grads[3:]:
        for pa, pb, gr in zip(a, b, step_grads):
            pa.grad, pb.grad = gr, gr.clone()
        opt.step()
        resumed.step()
    same = all(torch.equal(x, y) for x, y in zip(a, b)) and all(
        torch.equal(opt.state[x][k], resumed.state[y][k]) for x, y in zip(a, b) for k in opt.state[x] if k != "step")
    run.check("paged 8-bit state_dict -> fresh paged optimizer: identical next steps", same)
    held = managed_bytes_live() - live_before
    del opt, resumed, sd
    gc.collect()
    torch.cuda.synchronize()
    run.check("deleting paged optimizers returns their managed memory",
              managed_bytes_live() == live_before and held > 0,
              f"{held / 2**20:.1f} MiB held, {(managed_bytes_live() - live_before) / 2**20:.1f} MiB left")
    release()


# --- 2-4. bytes, step time, peaks ----------------------------------------------------------------------------

def step_time_and_peaks(run: Run, device: torch.device, nvml: Nvml) -> dict:
    params = adapter_params(device)
    n_params = sum(p.numel() for p in params)
    out: dict = {"adapter_params": n_params, "adapter_tensors": len(params), "state_bytes": {}, "step_ms": {},
                 "peaks": {}, "evicted": {}}
    print(f"\nLlama-3-8B adapters, r={RANK}, all linears: {len(params)} tensors, {n_params:,} parameters", flush=True)
    for state_bits in (32, 8):
        opts: dict[str, AdamW] = {}
        for placement, paged in [*PLACEMENTS.items(), ("managed_always", True)]:
            release()
            torch.cuda.reset_peak_memory_stats(device)
            base_alloc = torch.cuda.memory_allocated(device)
            base_used = nvml.used() if nvml.ok else None

            def build_and_step(paged=paged, placement=placement):
                opt = AdamW(params, lr=2e-4, weight_decay=0.0, state_bits=state_bits, paged=paged,
                            prefetch="always" if placement == "managed_always" else "auto")
                for _ in range(3):
                    opt.step()
                return opt

            opt, peak_used = nvml.sample_during(build_and_step)
            opts[placement] = opt
            out["peaks"][f"{state_bits}bit_{placement}"] = {
                "torch_peak_increment_bytes": torch.cuda.max_memory_allocated(device) - base_alloc,
                "device_peak_increment_bytes": None if peak_used is None else peak_used - base_used,
                "state_bytes": bytes_of(opt),
            }
        out["state_bytes"][f"{state_bits}bit"] = bytes_of(opts["device"])
        # Interleaved rounds so that clock and neighbour drift hit all placements alike.
        samples: dict[str, list[float]] = {pl: [] for pl in opts}
        for _ in range(6):
            for pl, opt in opts.items():
                samples[pl] += timed_steps(opt, 8 if pl != "pinned" else 3)
        for pl, xs in samples.items():
            out["step_ms"][f"{state_bits}bit_{pl}"] = {"median": statistics.median(xs), "min": min(xs), "n": len(xs)}
        dev, man, always = (statistics.median(samples[k]) for k in ("device", "managed", "managed_always"))
        over = (man - dev) / dev
        auto_stats = dict(managed_arena(opts["managed"]).prefetch.stats)
        out.setdefault("auto_prefetch_stats", {})[f"{state_bits}bit"] = auto_stats
        run.check(f"{state_bits}-bit paged, prefetch auto: no prefetch call while nothing is evicted",
                  auto_stats["prefetches"] == 0 and auto_stats["updates_timed"] > 0, str(auto_stats))
        run.target(f"{state_bits}-bit paged step overhead <= 3% (nothing evicted; prefetch auto, the default)",
                   over <= 0.03,
                   f"device {dev:.3f} ms, paged {man:.3f} ms ({over:+.1%}); prefetching before every update "
                   f"(prefetch always): {always:.3f} ms ({(always - dev) / dev:+.1%}), "
                   f"{(always - dev) / (QLORA_STEP_S * 1e3):+.3%} of a {QLORA_STEP_S:.2f} s QLoRA step")
        # The prefetch call itself, on a resident buffer (host-side cost).
        arena = managed_arena(opts["managed"])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(100):
            prefetch(arena.buffer)
        torch.cuda.synchronize()
        out[f"prefetch_call_ms_{state_bits}bit"] = (time.perf_counter() - t0) * 10  # per call, buffer resident
        # Paged states after an eviction, emulated by migrating them to host memory (no memory pressure made).
        ev: dict = {"pinned_step_ms": statistics.median(samples["pinned"])}
        for mode in ("prefetch", "page_faults"):
            arena.prefetch.set_mode("always" if mode == "prefetch" else "never")
            try:
                xs = []
                for _ in range(3):
                    prefetch(arena.buffer, to_host=True)
                    torch.cuda.synchronize()
                    xs += timed_steps(opts["managed"], 1)
                ev[mode] = {"median": statistics.median(xs), "all": xs,
                            "effective_GBps": arena.nbytes / (statistics.median(xs) * 1e-3) / 1e9}
            except Exception as err:  # noqa: BLE001 - a driver without host prefetch: say so, keep the rest
                ev[mode] = {"median": float("nan"), "error": f"{type(err).__name__}: {err}"}
                run.check(f"{state_bits}-bit paged states migrated to host and back ({mode})", False, ev[mode]["error"])
            finally:
                arena.prefetch.set_mode("auto")
        # The default policy under repeated evictions: resident steps, then an eviction before each of 4 steps
        # (the first runs on faults and switches prefetching on, the next ones migrate in bulk), then resident.
        try:
            policy = arena.prefetch
            timed_steps(opts["managed"], 3)
            seq = []
            for _ in range(4):
                prefetch(arena.buffer, to_host=True)
                torch.cuda.synchronize()
                seq += timed_steps(opts["managed"], 1)
            seq += timed_steps(opts["managed"], 2)
            ev["auto_sequence_ms"] = seq
            ev["auto_stats"] = dict(policy.stats)
            run.check(f"{state_bits}-bit paged, prefetch auto: after an eviction is seen, evicted states come back "
                      "by bulk prefetch", policy.prefetching and seq[2] < 0.7 * seq[0],
                      f"steps after evictions {[round(x, 1) for x in seq[:4]]} ms, then {[round(x, 2) for x in seq[4:]]}")
        except Exception as err:  # noqa: BLE001
            run.check(f"{state_bits}-bit paged, prefetch auto under evictions", False, f"{type(err).__name__}: {err}")
        out["evicted"][f"{state_bits}bit"] = ev
        print(f"{state_bits}-bit states {bytes_of(opts['device']) / GIB:.3f} GiB; step ms: device {dev:.3f}, "
              f"paged {man:.3f}, pinned {ev['pinned_step_ms']:.3f}; paged after host migration: prefetch "
              f"{ev['prefetch']['median']:.2f}, page faults {ev['page_faults']['median']:.2f}", flush=True)
        del opts, opt, arena
        release()
    ratio = out["state_bytes"]["32bit"] / out["state_bytes"]["8bit"]
    run.check("8-bit states about 4x smaller than 32-bit", 3.5 < ratio < 4.5, f"ratio {ratio:.2f}")
    return out


# --- 5. the memory cap ---------------------------------------------------------------------------------------

class LoraMlpStack:
    """`blocks` frozen bf16 MLP blocks (gate/up 4096->14336, down 14336->4096) with LoRA on each projection,
    the adapters taken from the 8B adapter set (layers 0..blocks-1), so those get real gradients."""

    def __init__(self, params: list[torch.nn.Parameter], blocks: int, device: torch.device):
        g = torch.Generator(device=device).manual_seed(5)
        per_layer = 2 * len(MODULES)
        names = list(MODULES)
        self.blocks = []
        for b in range(blocks):
            ad = {n: (params[b * per_layer + 2 * i], params[b * per_layer + 2 * i + 1]) for i, n in enumerate(names)}
            w = {n: torch.randn(MODULES[n][1], MODULES[n][0], device=device, dtype=torch.bfloat16, generator=g) * 0.02
                 for n in ("gate", "up", "down")}
            self.blocks.append((w, ad))
        self.trained = [p for _, ad in self.blocks for n in ("gate", "up", "down") for p in ad[n]]

    @staticmethod
    def _lin(x, w, a, b):
        return x @ w.T + (x @ a.to(torch.bfloat16).T) @ b.to(torch.bfloat16).T

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        for w, ad in self.blocks:
            h = F.silu(self._lin(x, w["gate"], *ad["gate"])) * self._lin(x, w["up"], *ad["up"])
            x = x + self._lin(h, w["down"], *ad["down"])
        return x.float().pow(2).mean()


def cap_run(run: Run, device: torch.device, short: int, long: int) -> dict:
    params = adapter_params(device, seed=6)
    stack = LoraMlpStack(params, blocks=2, device=device)
    g = torch.Generator(device=device).manual_seed(7)
    xs = {t: torch.randn(t, HIDDEN, device=device, dtype=torch.bfloat16, generator=g) for t in (short, long)}
    res: dict = {"tokens_short": short, "tokens_long": long, "runs": {}}

    def attempt(state_bits: int, paged, cap_fraction: float | None) -> dict:
        release()
        if cap_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(cap_fraction, device)
        torch.cuda.reset_peak_memory_stats(device)
        opt = None
        rec: dict = {"state_bits": state_bits, "paged": paged}
        try:
            opt = AdamW(params, lr=1e-4, weight_decay=0.0, state_bits=state_bits, paged=paged)
            for t in (short, long):  # the short step allocates the states, the long one is the spike
                for p in stack.trained:
                    p.grad = None
                stack.loss(xs[t]).backward()
                opt.step()
                torch.cuda.synchronize()
            rec["completed"] = True
        except torch.OutOfMemoryError as err:
            rec["completed"] = False
            rec["oom"] = str(err).splitlines()[0][:300]
        finally:
            rec["torch_peak_allocated"] = torch.cuda.max_memory_allocated(device)
            rec["torch_peak_reserved"] = torch.cuda.max_memory_reserved(device)
            rec["state_bytes"] = bytes_of(opt) if opt is not None else None
            for p in stack.trained:
                p.grad = torch.zeros_like(p)
            del opt
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            release()
        return rec

    free_run = attempt(32, True, None)  # paged: states outside torch's count
    held_run = attempt(32, False, None)  # torch-held states
    res["runs"]["uncapped_paged_32bit"] = free_run
    res["runs"]["uncapped_device_32bit"] = held_run
    total = torch.cuda.get_device_properties(device).total_memory
    states = held_run["state_bytes"] or 0
    without, with_states = free_run["torch_peak_allocated"], held_run["torch_peak_allocated"]
    cap = without + states // 2  # halfway: torch-held states cannot fit, states outside torch leave half a margin
    res["cap_bytes"] = cap
    res["cap_fraction"] = cap / total
    print(f"\ncap run: peak torch memory {without / GIB:.2f} GiB with paged states, {with_states / GIB:.2f} GiB with "
          f"torch-held ones ({states / GIB:.2f} GiB of states); cap {cap / GIB:.2f} GiB ({cap / total:.4f} of "
          f"{total / GIB:.0f} GiB)", flush=True)
    if not run.check("cap run: torch-held states raise the torch peak by about their size",
                     with_states - without > 0.75 * states,
                     f"+{(with_states - without) / GIB:.2f} GiB for {states / GIB:.2f} GiB of states"):
        return res
    for name, bits_, paged in (("device_32bit", 32, False), ("paged_32bit", 32, True), ("pinned_32bit", 32, "pinned"),
                               ("device_8bit", 8, False)):
        rec = attempt(bits_, paged, cap / total)
        res["runs"][f"capped_{name}"] = rec
        state = "completed" if rec["completed"] else "out of memory"
        print(f"  under the cap, {name}: {state} (torch peak {rec['torch_peak_allocated'] / GIB:.2f} GiB)", flush=True)
    runs = res["runs"]
    run.check("under the cap, torch-held 32-bit states run out of memory on the long sequence",
              not runs["capped_device_32bit"]["completed"])
    run.check("under the cap, paged 32-bit states complete", runs["capped_paged_32bit"]["completed"])
    run.check("under the cap, pinned-offloaded 32-bit states complete", runs["capped_pinned_32bit"]["completed"])
    return res


# --- report --------------------------------------------------------------------------------------------------

def table(r: dict) -> str:
    s = r.get("steps", {})
    lines = ["", "== qlorakit optimizers, Llama-3-8B adapters r=64 all-linear "
             f"({s.get('adapter_params', 0):,} params) on {r['gpu']} =="]
    if s:
        lines.append(f"{'states':<8}{'bytes':>11}{'device ms':>11}{'paged ms':>10}{'overhead':>10}{'pinned ms':>11}"
                     f"{'evicted+prefetch':>18}{'evicted+faults':>16}")
        for b in ("32bit", "8bit"):
            st = s["step_ms"]
            dev, man, pin = (st[f"{b}_{k}"]["median"] for k in ("device", "managed", "pinned"))
            ev = s["evicted"][b]
            lines.append(f"{b:<8}{s['state_bytes'][b] / GIB:>9.3f}Gi{dev:>11.3f}{man:>10.3f}{(man - dev) / dev:>+10.1%}"
                         f"{pin:>11.2f}{ev['prefetch']['median']:>16.2f}ms{ev['page_faults']['median']:>14.2f}ms")
            alw = st[f"{b}_managed_always"]["median"]
            lines.append(f"{'':<8}paged with a prefetch before every update: {alw:.3f} ms ({(alw - dev) / dev:+.1%}); "
                         f"auto under evictions: {[round(x, 1) for x in ev.get('auto_sequence_ms', [])]} ms")
        lines.append(f"8-bit / 32-bit state bytes: 1 / {s['state_bytes']['32bit'] / s['state_bytes']['8bit']:.2f}")
        lines.append("peak increments over params+grads (GiB):   torch-counted   device-wide (NVML)")
        for k, v in s["peaks"].items():
            dw = v["device_peak_increment_bytes"]
            lines.append(f"  {k:<18}{v['torch_peak_increment_bytes'] / GIB:>24.3f}"
                         f"{'n/a' if dw is None else f'{dw / GIB:.3f}':>21}")
    c = r.get("cap", {})
    if c.get("runs") and "capped_device_32bit" in c["runs"]:
        lines.append(f"torch cap {c['cap_bytes'] / GIB:.2f} GiB, {c['tokens_long']}-token batch: " + ", ".join(
            f"{k.removeprefix('capped_')} {'completes' if v['completed'] else 'OOM'}"
            for k, v in c["runs"].items() if k.startswith("capped_")))
    lines.append(f"checks: {sum(x['pass'] for x in r['checks'])}/{len(r['checks'])} PASS"
                 + (f"; FAILED: {r['failed_checks']}" if r["failed_checks"] else ""))
    lines.append("targets: " + "; ".join(f"{t['name']}: {'met' if t['met'] else 'MISSED'}" for t in r["targets"]))
    return "\n".join(lines)


NOTES = [
    "bytes: optimizer state proper (moments; for 8-bit also the fp32 absmax per 256 elements), not padding.",
    "step ms: wall clock of optimizer.step() with a synchronize before and after, median of interleaved rounds; "
    "paged = states in managed memory resident on the GPU (nothing evicted), with the default prefetch policy "
    "(auto: prefetch only while evictions are seen, so no prefetch call here); managed_always = the same with a "
    "prefetch before every update (the driver walks the whole range each call, even with every page resident).",
    "auto under evictions: 3 resident steps, then 4 steps each after the states were migrated to host memory "
    "(the first pays page faults and switches prefetching on; the next ones migrate in bulk), then 2 resident.",
    "evicted+prefetch / evicted+faults: paged states first migrated to host memory with cudaMemPrefetchAsync "
    "(what eviction does, without memory pressure); the step then brings them back by the optimizer's bulk "
    "prefetch, or by GPU page faults with the prefetch switched off. The pinned offload pays a copy in and out "
    "every step whether or not memory is short; paged states pay only after the driver has evicted them.",
    "torch-counted peak: max_memory_allocated increment; device-wide: NVML used-memory increment (sampled, all "
    "processes on the card: others' activity shows up here). Managed states count device-wide while resident, "
    "never in torch's figure; pinned states count in neither (only the two staging buffers do).",
    "cap run: torch.cuda.set_per_process_memory_fraction limits torch's allocator only; managed and pinned memory "
    "are outside it. That the paged run completes under the cap shows that its states left the allocator's "
    "budget, not that the driver paged anything: the card had free memory throughout.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for optim.json")
    parser.add_argument("--long-tokens", type=int, default=16384, help="tokens of the cap run's long batch")
    parser.add_argument("--allocator-default", action="store_true",
                        help="leave PYTORCH_CUDA_ALLOC_CONF alone (default: expandable_segments:True)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/optim.py needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this benchmark times compiled kernels", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    if free < NEED_FREE:
        print(f"only {free / GIB:.1f} GiB of {total / GIB:.0f} GiB free on {device}; this benchmark needs "
              f"{NEED_FREE / GIB:.0f} GiB free and does not run on a busier card", file=sys.stderr)
        return 2
    import triton

    from qlorakit.optim.cudart import DEV_ATTR_CONCURRENT_MANAGED_ACCESS, cuda_runtime

    nvml = Nvml(device)
    try:
        rt = cuda_runtime()
        cudart = {"version": rt.version, "path": rt.path,
                  "concurrent_managed_access": rt.device_attribute(DEV_ATTR_CONCURRENT_MANAGED_ACCESS, device.index)}
    except Exception as err:  # noqa: BLE001 - the paged sections will fail and say why; the rest still runs
        cudart = {"version": None, "path": None, "concurrent_managed_access": None,
                  "error": f"{type(err).__name__}: {err}"}
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": os.environ.get("QLORAKIT_COMMIT") or sh("git", "rev-parse", "HEAD"),
        "git_dirty": sh("git", "status", "--porcelain", "--untracked-files=no") not in ("", "unknown"),
        "gpu": torch.cuda.get_device_name(device),
        "memory_total_bytes": total,
        "memory_free_at_start_bytes": free,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "cuda_torch": torch.version.cuda, "nvml": "ok" if nvml.ok else nvml.error},
        "cudart": cudart,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "managed_free_margin_bytes": FREE_MEMORY_MARGIN,
        "notes": NOTES,
    }
    print(f"{results['gpu']}, torch {torch.__version__}, triton {triton.__version__}, cudart {cudart}, "
          f"{free / GIB:.0f}/{total / GIB:.0f} GiB free", flush=True)
    run = Run()
    start = time.time()
    sections = [("kernel", lambda: kernel_checks(run, device)), ("torch", lambda: torch_adamw_check(run, device)),
                ("placement", lambda: placement_checks(run, device)),
                ("checkpoint", lambda: checkpoint_and_free_checks(run, device)),
                ("steps", lambda: step_time_and_peaks(run, device, nvml)),
                ("cap", lambda: cap_run(run, device, 1024, args.long_tokens))]
    for name, fn in sections:
        try:
            out = fn()
            if out is not None:
                results[name] = out
        except Exception:  # noqa: BLE001 - record what broke, keep the numbers gathered so far
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            run.check(f"section {name} ran to the end", False, tb.strip().splitlines()[-1])
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        release()  # each section's tensors are gone with its frame; hand the cache back before the next one
    results["checks"] = run.checks
    results["failed_checks"] = run.failed
    results["targets"] = run.targets
    results["seconds"] = time.time() - start
    results["torch_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    (args.out / "optim.json").write_text(json.dumps(results, indent=2, default=str))
    for note in NOTES:
        print("note:", note)
    try:
        print(table(results))
    except Exception as err:  # noqa: BLE001 - a partial run still reports its checks
        print(f"(no table: {err}); checks {len(run.checks) - len(run.failed)}/{len(run.checks)} PASS; "
              f"FAILED: {run.failed}")
    print(f"wrote {args.out / 'optim.json'} ({results['seconds']:.0f} s)")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
