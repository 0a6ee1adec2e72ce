"""benchmarks/compile_check.py, the check that a fused decoder layer compiles: its parts that need no GPU. The
summary of torch._dynamo.explain counts graphs and breaks, gives each break reason on one line with its user
frame, and counts the qlorakit custom ops in the captured graphs, inside autograd functions' subgraphs too; without
a GPU the default run says so in one line and exits 2; `--device cpu` runs the whole check on a tiny model: one
fused layer with LoRA dropout traces without a graph break, compiles with fullgraph=True, and (AOT autograd without
inductor) computes exactly what eager computes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from qlorakit import kernels
from qlorakit.nn.rmsnorm import rms_norm

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_check.py"


@pytest.fixture(scope="module")
def compile_check():
    spec = importlib.util.spec_from_file_location("compile_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_summary_counts_breaks_and_the_qlorakit_ops_in_every_subgraph(compile_check):
    w = torch.randn(16)

    def block(x):
        y = rms_norm(x, w, 1e-6)  # an autograd function: its forward and backward are subgraphs
        torch._dynamo.graph_break()
        return kernels.call("swiglu", y)

    torch._dynamo.reset()
    summary = compile_check.summarize(torch._dynamo.explain(block)(torch.randn(4, 16, requires_grad=True)))
    assert summary["graphs"] == 2 and summary["graph_breaks"] == 1
    (reason,) = summary["break_reasons"]
    assert "graph_break()" in reason and reason.endswith(f"({Path(__file__).name}:{_line_of('graph_break()')})")
    assert summary["qlorakit_ops"] == {"qlorakit::rms_norm": 1, "qlorakit::rms_norm_backward": 1,
                                       "qlorakit::swiglu": 1}


def _line_of(text: str) -> int:
    lines = Path(__file__).read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip().startswith("torch._dynamo." + text))


def test_the_table_aligns_two_columns(compile_check):
    assert compile_check.table([("a", "1"), ("longer", "2")]).splitlines() == ["a       1", "longer  2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole check")
def test_without_a_gpu_it_says_so_and_exits_2(compile_check, tmp_path, capsys):
    assert compile_check.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("compile_check: needs a CUDA GPU (the fused blocks' Triton kernels); "
                                               "none is visible (--device cpu: a tiny model on the reference "
                                               "kernels)")
    assert list(tmp_path.iterdir()) == []


def test_on_the_cpu_a_fused_layer_with_dropout_compiles_without_graph_breaks(compile_check, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORAKIT_KERNELS", "reference")  # also in the --kernel-backend triton run
    previous = kernels.set_backend("auto")
    try:
        with torch._inductor.config.patch(fallback_random=False):  # the script sets it; put back afterwards
            assert compile_check.main(["--device", "cpu", "--backend", "aot_eager", "--layers", "1", "--tokens", "24",
                                       "--dropout", "0.05", "--steps", "1", "--out", str(tmp_path)]) == 0
    finally:
        kernels.set_backend(previous)
        torch._dynamo.reset()
    record = json.loads((tmp_path / "compile_check.json").read_text())
    assert (record["explain"]["graphs"], record["explain"]["graph_breaks"]) == (1, 0) and record["fullgraph"]["ok"]
    assert record["explain"]["qlorakit_ops"]["qlorakit::dropout_draw"] == 7  # q, k, v, o, gate, up, down
    assert record["explain"]["qlorakit_ops"]["qlorakit::dropout_replay"] == 7
    assert record["errors"] == {"output": 0.0, "d hidden": 0.0, "worst LoRA grad": 0.0}
