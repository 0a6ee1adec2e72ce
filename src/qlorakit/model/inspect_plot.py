"""`qlorakit inspect --plot PATH.png`: the report's errors against the linear's position in the model.

Top panel: the NF4, FP4 and INT4 weight reconstruction errors ||W - deq(q(W))|| / ||W|| of every quantized linear,
in the model's order (x = 0, 1, ...: the order of `qlorakit inspect --json-path`'s layers); the x ticks name the
decoder block a linear belongs to (the first integer in its module path). NF4 outliers are circled in red and
layers where FP4 or INT4 beats NF4 get an orange tick at the bottom. Bottom panel, when the report has output
errors: the same for ||XW^T - X deq(q(W))^T|| / ||XW^T||. Written whole or not at all (atomic.write_bytes).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from ..atomic import write_bytes
from ..errors import OptionValueError
from .inspect_weights import TYPES, InspectReport

COLOURS = {"nf4": "tab:blue", "fp4": "tab:green", "int4": "tab:purple"}
MAX_TICKS = 16


def check_png_path(path: str | Path) -> Path:
    """`path` as a Path if it names a .png file (any case); OptionValueError, one line, otherwise."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise OptionValueError(f"--plot {path}: the plot is a PNG image; give a path ending in .png")
    return p


def block_ticks(names: list[str]) -> tuple[list[int], list[str]]:
    """(x positions, labels): where each decoder block's first linear sits, labelled with the block's number,
    thinned to at most MAX_TICKS; a name without an integer part gets no tick."""
    starts: list[tuple[int, str]] = []
    for x, name in enumerate(names):
        found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        if found and (not starts or starts[-1][1] != found.group(1)):
            starts.append((x, found.group(1)))
    step = max(1, -(-len(starts) // MAX_TICKS))
    kept = starts[::step]
    return [x for x, _ in kept], [label for _, label in kept]


def plot_report(report: InspectReport, path: str | Path) -> Path:
    """Draw the report (module docstring) and write it to `path` (must end in .png); returns the path."""
    from matplotlib.figure import Figure

    out = check_png_path(path)
    measured = report.mean_output_errors() is not None
    names = [layer.name for layer in report.layers]
    fig = Figure(figsize=(max(7.0, min(18.0, len(names) / 14)), 6.5 if measured else 4.0), dpi=110)
    axes = fig.subplots(2 if measured else 1, 1, sharex=True, squeeze=False)[:, 0]
    panels = [("weight error", [layer.error for layer in report.layers],
               [layer.nf4_outlier for layer in report.layers], [bool(layer.beaten_by) for layer in report.layers])]
    if measured:
        panels.append((f"output error ({report.calibration_tokens} tokens)",
                       [layer.output_error for layer in report.layers],
                       [layer.output_outlier for layer in report.layers],
                       [bool(layer.output_beaten_by) for layer in report.layers]))
    for ax, (label, errors, outliers, beaten) in zip(axes, panels):
        xs = [x for x, e in enumerate(errors) if e is not None]
        for kind in TYPES:
            ax.plot(xs, [errors[x][kind] for x in xs], marker=".", markersize=3, linewidth=0.8,
                    color=COLOURS[kind], label=kind.upper())
        flagged = [x for x in xs if outliers[x]]
        if flagged:
            ax.scatter(flagged, [errors[x]["nf4"] for x in flagged], s=60, facecolors="none", edgecolors="red",
                       linewidths=1.2, zorder=3, label="NF4 outlier (> median + 3 MAD)")
        worse = [x for x in xs if beaten[x]]
        if worse:
            ax.plot(worse, [0.0] * len(worse), linestyle="none", marker="|", markersize=10, color="orange",
                    transform=ax.get_xaxis_transform(), label="FP4 or INT4 beats NF4")
        ax.set_ylabel(f"relative {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    ticks, labels = block_ticks(names)
    axes[-1].set_xticks(ticks, labels)
    axes[-1].set_xlabel("quantized linear, in model order (ticks: decoder block)")
    axes[0].set_title(f"{Path(report.model_dir).name}: {len(names)} linears, blocksize {report.blocksize}",
                      fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return write_bytes(out, buffer.getvalue())
