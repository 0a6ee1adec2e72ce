"""A preference step queues its work without waiting for it: between the reference forward and the backward
nothing reads a value back from the device.

On a GPU, an op that needs a tensor's value on the host (`.item()`, a boolean mask's `nonzero`, transformers'
check whether a padding mask can be skipped) waits until everything queued before it has run, so the GPU drains
and then idles while the host queues the next kernels. A 1-pair DPO step is bound by the host, which makes such
a wait cost its full length (benchmarks/results/host_profile-dpo-h100.json found the log-prob step's masks).
Here, on the CPU, every op of the step is recorded and none of qlorakit's may read a value back: the positions
that count come from train/preference.logp_index (made on the CPU before), the decoder runs without the padding
mask of a right-padded batch (SDPA's causal kernels), and the metrics stay tensors until the backward is queued.
transformers' own mask code reads one value per decoder forward; that one is counted, not avoided.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlorakit.train.preference import PreferenceSettings, logp_index, preference_loss, reference_logps, \
    sequence_logps
from qlorakit.train.shared_prompt import layout_for

from test_shared_prompt import LENGTHS, _model, _pairs

READ_BACK = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "item")


class Ops(TorchDispatchMode):
    """Records every op's name, and for each read-back the file that asked for it (transformers or not)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.read_back: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        if any(r in func.__name__ for r in READ_BACK):
            files = [f.filename for f in traceback.extract_stack()]
            self.read_back.append("transformers" if any("transformers" in f and "masking_utils" in f for f in files)
                                  else f"{func.__name__} from {[f for f in files if 'qlorakit' in f][-1:]}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_the_step_reads_nothing_back(share, objective):
    model = _model()
    batch = _pairs(LENGTHS, seed=4).collate([[i] for i in range(len(LENGTHS))], pad_id=0)
    layout = layout_for(model, batch, torch.float32) if share else None
    nll = objective == "orpo"
    index = logp_index(batch, nll, layout)
    assert index.right_padded  # the collate pads on the right: the decoder runs without the mask
    ops = Ops()
    with ops:
        reference = reference_logps(model, batch, layout=layout, index=index) if objective == "dpo" else None
        policy = sequence_logps(model, batch, with_nll=nll, layout=layout, index=index)
        loss, metrics = preference_loss(PreferenceSettings(objective), policy, reference, lazy=True)
        loss.backward()
    assert len(ops.names) > 100  # the step ran under the recorder
    ours = [r for r in ops.read_back if r != "transformers"]
    assert ours == [], ours
    # transformers (5.x) reads one value back per decoder forward, whatever it is given: a 2-D padding mask (can
    # it be skipped?) or none (are the position ids packed?); a 4-D mask avoids it but loses SDPA's causal kernels
    forwards = 2 if objective == "dpo" else 1
    assert ops.read_back.count("transformers") <= (0 if share else forwards)  # shared rows: a 4-D mask
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    # the control: float metrics read back (the recorder sees it)
    control = Ops()
    with control:
        preference_loss(PreferenceSettings(objective), policy, reference)
    assert control.read_back and "transformers" not in control.read_back
