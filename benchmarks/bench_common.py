"""What the GPU benchmarks share: a recorder of PASS/FAIL checks and of targets met or missed, printed as they
come, git metadata that never fails the run, and a sampler of the device-wide (NVML) memory peak."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Run:
    def __init__(self) -> None:
        self.checks: list[dict] = []
        self.targets: list[dict] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "pass": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {name}{'  ' + detail if detail else ''}", flush=True)
        return ok

    def target(self, name: str, met: bool, detail: str) -> None:
        self.targets.append({"name": name, "met": bool(met), "detail": detail})
        print(f"{'MET ' if met else 'MISS'}  {name}  {detail}", flush=True)

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.checks if not c["pass"]]


def sh(*cmd: str) -> str:
    """A command's stdout in the repository root, or 'unknown' (git missing, no repository)."""
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - metadata only
        return "unknown"


class NvmlPeak:
    """`with NvmlPeak() as nv: ...` then nv.peak: the largest device-wide used memory (bytes, what nvidia-smi
    shows) sampled every `every` seconds on the current CUDA device (or the NVML handle given)."""

    def __init__(self, handle=None, every: float = 0.005):
        self.handle, self.every, self.peak, self._stop = handle, every, 0, False

    def __enter__(self):
        import pynvml
        import torch

        pynvml.nvmlInit()
        if self.handle is None:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

        def run():
            while not self._stop:
                self.peak = max(self.peak, pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
                time.sleep(self.every)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def plan_within(shape: str, layers: int, batch: int, seq: int, budget_gib: float, torch_budget_gib: float, *,
                rank: int, dropout: float, optimizer: str, adapter_dtype: str = "float32"):
    """What `training.memory_budget_gib: budget_gib` plans (memory/plan.py) for a random-init `shape` (cut to
    `layers` if nonzero) at batch x seq, with the torch peak also kept within `torch_budget_gib`: the MemoryPlan,
    whose .config.training holds the keep / host / offload / embeddings / head / stacked-dequant choices."""
    import tempfile

    from transformers import LlamaConfig

    from qlorakit.config import config_from_dict
    from qlorakit.memory import ModelShape
    from qlorakit.memory.plan import plan_memory
    from qlorakit.model.synthetic import SHAPES

    fields = dict(SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    with tempfile.TemporaryDirectory() as tmp:
        LlamaConfig(**fields).save_pretrained(tmp)
        cfg = config_from_dict({
            "model": {"name": tmp}, "lora": {"rank": rank, "alpha": 16, "dropout": dropout,
                                              "target_modules": "all-linear", "adapter_dtype": adapter_dtype},
            "training": {"batch_size": batch, "max_seq_length": seq, "gradient_accumulation": 1,
                         "optimizer": optimizer, "max_grad_norm": None if optimizer == "host_adamw_32bit" else 0.3},
            "data": {"packing": False}})
        return plan_memory(cfg, ModelShape(tmp), budget_gib, cuda=True, torch_budget_gib=torch_budget_gib)


def place_activations(model, tokens: int, keep_gib: float, host_gib: float, offload: bool):
    """training.keep_activations_gib / host_activations_gib / offload_activations on a checkpointed model, as
    `qlorakit train` applies them (any earlier offloading undone first): the keep plan and the hosted offload."""
    from qlorakit.model.fused_blocks import keep_activations
    from qlorakit.model.offload import decoder_layers, offload_layer_inputs, stop_offloading
    from qlorakit.model.offload_saved import host_saved_activations

    stop_offloading(model)
    plan = keep_activations(model, tokens, int(keep_gib * 2**30), int(host_gib * 2**30))
    hosted = host_saved_activations(model, list(plan.hosted_indices))
    if offload:  # the recomputed layers' inputs wait in pinned host memory
        offload_layer_inputs(model, [i for i, layer in enumerate(decoder_layers(model))
                                     if layer.gradient_checkpointing and i not in plan.hosted_indices])
    return plan, hosted
