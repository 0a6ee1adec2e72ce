"""Data-parallel training (training.distributed: ddp) with two gloo processes on the CPU, started by torchrun,
against one process: the same per-step losses and the same saved adapter, and a two-process run stopped after
step 2 and resumed gives them too.

Why equality holds: both runs forward the same micro-batches (batch 2 x accumulation 2; each rank takes one of a
step's two micro-batches) with the same single-threaded kernels, and normalise by the step's global target
count. The only difference is where the two micro-batches' gradients are added (autograd accumulation in one
process, the all-reduce in two): a + b either way. The tolerance (1e-6 relative) is there for other kernels
or world sizes, where the sum's order can change the last bits; the observed difference is printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import one_thread, read_events, run_tree, train_losses, write_yaml
from safetensors.torch import load_file

from qlorakit.config import config_from_dict
from qlorakit.errors import CheckpointFormatError, QloraConfigError, RunConflictError
from qlorakit.train.distributed import DistContext, check_batch_split, init_distributed, resolve_mode
from qlorakit.train.run import run_training

STEPS = 4
RTOL = 1e-6
# Adapters after a few AdamW steps, against the one-process run. The ranks' GEMMs run with other thread counts
# (torchrun sets one thread a process; oneDNN on AVX512-BF16/AMX CPUs sums in yet another order), so gradients
# differ by fp32 rounding. Adam divides each element's gradient by its own RMS, so an element whose gradient is
# a near-cancelling sum can move by a sizeable part of the learning rate on one run and not the other (seen: one
# element of 1024 off by 3.6e-6 with lr 1e-2). So the adapters are compared in two ways that follow from Adam:
# - per element, by what Adam can move an element at all: |m_hat / sqrt(v_hat)| <= _adam_ratio_bound(t) at
#   step t for any gradient history (Cauchy-Schwarz), times that step's learning rate, twice for two runs;
# - per tensor, the Frobenius norm of the difference against the norm a whole tensor moves in training
#   (lr per step per element): rounding moves a few elements, a wrong gradient or batch moves most of them,
#   ~100% of that norm, so a tenth of a percent separates the two by three orders of magnitude.
LEARNING_RATE = 1e-2  # run_tree's
ADAPTER_NORM_FRACTION = 1e-3


def _adam_ratio_bound(t: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """max |m_hat / sqrt(v_hat)| over all gradient histories of t steps (bias-corrected Adam, eps ignored):
    sum_j (1-b1) b1^j |g_j| <= sqrt(sum_j b1^2j / b2^j) sqrt(sum_j b2^j g_j^2)."""
    spread = sum(beta1 ** (2 * j) / beta2 ** j for j in range(t)) ** 0.5
    return (1 - beta1) / (1 - beta1 ** t) * ((1 - beta2 ** t) / (1 - beta2)) ** 0.5 * spread


WORKER = Path(__file__).with_name("ddp_worker.py")
ADAPTER_FILE = "adapter_model.safetensors"


def _tree(model_dir, data, out, **training):
    return run_tree(model_dir, data, out, training={"max_steps": STEPS, "batch_size": 2,
                                                   "gradient_accumulation": 2, "eval_every": 2, **training})


def _torchrun(*args: str, cwd: Path, sharded: bool = False, **env_vars: str) -> str:
    """Two processes on this machine (gloo), each single-threaded; both must have joined one data-parallel run
    (sharded by FSDP2 if `sharded`). Returns their stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_vars)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for rank in (0, 1):
        mark = f"data-parallel rank {rank} of 2 (gloo{', FSDP2' if sharded else ''})"
        assert mark in proc.stderr, proc.stderr[-3000:]
    if sharded:
        assert "FSDP2 over 2 ranks" in proc.stderr and "packed 4-bit weights sharded as uint8" in proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, pattern_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    with one_thread():
        run_training(config_from_dict(_tree(tiny_model_dir, pattern_data, out)), progress=False)
    return out


def _max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in b)


def _assert_same_run(run: Path, ref: Path) -> None:
    losses, ref_losses = train_losses(run), train_losses(ref)
    assert sorted(losses) == list(range(1, STEPS + 1)) == sorted(ref_losses)
    print(f"\n{run.parent.name}: max relative train-loss difference {_max_rel_diff(losses, ref_losses):.3g}")
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=RTOL, abs=0), step
    evals = {r["step"]: r["eval_loss"] for r in read_events(run, "eval")}
    ref_evals = {r["step"]: r["eval_loss"] for r in read_events(ref, "eval")}
    assert evals.keys() == ref_evals.keys() == {0, 2, 4}
    for step, loss in ref_evals.items():
        assert evals[step] == pytest.approx(loss, rel=RTOL, abs=0), step

    adapter, ref_adapter = load_file(run / "adapter" / ADAPTER_FILE), load_file(ref / "adapter" / ADAPTER_FILE)
    assert adapter.keys() == ref_adapter.keys()
    worst = worst_norm = 0.0
    moved = LEARNING_RATE * STEPS  # an element's move in training at Adam ratio 1 (the schedule stays <= lr)
    reach = LEARNING_RATE * sum(_adam_ratio_bound(t) for t in range(1, STEPS + 1))
    for key, ref_t in ref_adapter.items():
        diff = (adapter[key] - ref_t).abs()
        assert float(diff.max()) <= 2 * reach, key
        norm = float(diff.norm()) / (moved * ref_t.numel() ** 0.5)
        assert norm <= ADAPTER_NORM_FRACTION, (key, norm)
        worst, worst_norm = max(worst, float(diff.max())), max(worst_norm, norm)
    print(f"{run.parent.name}: max absolute adapter difference {worst:.3g}; largest difference norm "
          f"{worst_norm:.3g} of a training move")


MODES = {"ddp": {}, "fsdp": {"distributed": "fsdp"}}


@pytest.mark.parametrize("mode", MODES)
def test_two_gloo_processes_match_one_process(tiny_model_dir, pattern_data, tmp_path, single_process, mode):
    """`torchrun --nproc-per-node 2 -m qlorakit.cli train CONFIG`, as the README says."""
    out = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", _tree(tiny_model_dir, pattern_data, out, **MODES[mode]))
    _torchrun("-m", "qlorakit.cli", "train", str(config), "--no-progress", cwd=tmp_path, sharded=mode == "fsdp")
    _assert_same_run(out, single_process)
    assert not list((out).glob("*.tmp*")) and (out / "summary.json").is_file()


@pytest.mark.parametrize("mode", MODES)
def test_fused_blocks_with_kept_activations_in_two_processes_match_one_process(tiny_model_dir, pattern_data, tmp_path,
                                                                               single_process, mode):
    """The fused Llama block paths (taken on the CPU only without dense weight copies) and kept activations,
    under DDP and FSDP2, against the one-process run through transformers' modules."""
    out = tmp_path / "run"
    tree = _tree(tiny_model_dir, pattern_data, out, gradient_checkpointing=True, keep_activations_gib=1e-4,
                 **MODES[mode])
    tree["model"]["cpu_dense_copies"] = False
    config = write_yaml(tmp_path / "run.yaml", tree)
    stderr = _torchrun("-m", "qlorakit.cli", "train", str(config), "--no-progress", cwd=tmp_path,
                       sharded=mode == "fsdp")
    assert "fused block paths:" in stderr and "attention (Q/K/V fused)" in stderr.split("not fused")[0]
    assert "layers keep theirs for backward" in stderr
    _assert_same_run(out, single_process)


@pytest.mark.parametrize("mode", MODES)
def test_two_process_run_stopped_and_resumed_matches_one_process(tiny_model_dir, pattern_data, tmp_path,
                                                                 single_process, mode):
    out = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", _tree(tiny_model_dir, pattern_data, out, **MODES[mode]))
    _torchrun(str(WORKER), str(config), "2", cwd=tmp_path, sharded=mode == "fsdp")
    step2 = out / "checkpoints" / "step-000002"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not (out / "adapter").exists()
    assert (step2 / "rng-rank1.safetensors").is_file()
    # A sharded run keeps each rank's optimizer shard; the adapter in the checkpoint is whole either way.
    assert (step2 / "optimizer-rank1.safetensors").is_file() == (mode == "fsdp")
    if mode == "fsdp":
        # One process may not continue a two-rank run: refused by the settings check, and with resume: force by
        # the optimizer shards, which only as many ranks can load.
        with pytest.raises(RunConflictError, match="world_size: 2 -> 1"):
            run_training(config_from_dict(_tree(tiny_model_dir, pattern_data, out)), progress=False)
        with pytest.raises(CheckpointFormatError, match="sharded \\(fsdp\\) run of 2 ranks"):
            run_training(config_from_dict(_tree(tiny_model_dir, pattern_data, out, resume="force")), progress=False)
    _torchrun(str(WORKER), str(config), cwd=tmp_path, sharded=mode == "fsdp")
    _assert_same_run(out, single_process)


def test_two_nodes_through_torchrun_rendezvous_match_one_process(tiny_model_dir, pattern_data, tmp_path,
                                                                 single_process):
    """Two 'hosts' of one process each, as two torchrun launchers meeting at a c10d rendezvous endpoint (the
    README's several-hosts command, with localhost as the first host's address), sharded with FSDP2."""
    import socket

    out = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", _tree(tiny_model_dir, pattern_data, out, distributed="fsdp"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "qlorakit-test",
           "-m", "qlorakit.cli", "train", str(config), "--no-progress"]
    nodes = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    logs = [node.communicate(timeout=300) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, logs):
        assert node.returncode == 0, f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    both = logs[0][1] + logs[1][1]
    for rank in (0, 1):
        assert f"data-parallel rank {rank} of 2 (gloo, FSDP2)" in both, both[-3000:]
    _assert_same_run(out, single_process)


def test_fsdp_shards_the_packed_weights_as_uint8_and_gathers_them_unchanged(tiny_model_dir, tmp_path):
    """Each rank holds part of every packed 4-bit weight, as uint8; gathered, the bytes are the quantized ones."""
    _torchrun(str(Path(__file__).with_name("fsdp_worker.py")), str(tiny_model_dir), cwd=tmp_path, sharded=True)


def test_accumulation_must_divide_over_ranks():
    check_batch_split(4, DistContext(rank=0, world_size=2))
    with pytest.raises(QloraConfigError, match="multiple of the world size 2"):
        check_batch_split(3, DistContext(rank=1, world_size=2))


def test_without_torchrun_auto_is_one_process_and_ddp_is_refused(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not init_distributed(mode="auto").enabled
    with pytest.raises(QloraConfigError, match="not started by torchrun"):
        resolve_mode("ddp", None)


def test_distributed_key_is_validated(tiny_model_dir, pattern_data, tmp_path):
    tree = _tree(tiny_model_dir, pattern_data, tmp_path / "run")
    tree["training"]["distributed"] = "zero3"
    with pytest.raises(QloraConfigError, match="distributed"):
        config_from_dict(tree)


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory) -> Path:
    import json

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": " Paris."}
            for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-per-step", "precomputed-reference"])
def test_dpo_in_two_processes_matches_one_process(tiny_model_dir, pairs_data, tmp_path, precompute):
    """training.objective dpo under DDP: each rank takes one of a step's two micro-batches of pairs, the
    gradients are summed, the pairs' mean loss is the one-process run's; with precomputed reference log-probs
    every rank computes them all and rank 0 writes the file."""
    tree = {"objective": "dpo", "precompute_ref_logps": precompute, "learning_rate": 1e-2}
    with one_thread():
        run_training(config_from_dict(_tree(tiny_model_dir, pairs_data, tmp_path / "one", **tree)), progress=False)
    out = tmp_path / "two" / "run"
    config = write_yaml(tmp_path / "run.yaml", _tree(tiny_model_dir, pairs_data, out, **tree))
    stderr = _torchrun(str(WORKER), str(config), cwd=tmp_path)
    assert ("reference log-probs of" in stderr) == precompute
    _assert_same_run(out, tmp_path / "one")
    assert (out / "ref_logps.safetensors").is_file() == precompute
