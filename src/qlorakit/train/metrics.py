"""Run metrics: metrics.jsonl (one JSON object per event), TensorBoard when installed, loss.png at the end."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..errors import CheckpointWriteError

log = logging.getLogger("qlorakit.train")


class MetricsWriter:
    """Appends records to `<run>/metrics.jsonl`; mirrors scalars to TensorBoard if it can be imported."""

    def __init__(self, run_dir: Path, resume_from_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.kept: list[dict[str, Any]] = []  # the records of steps up to resume_from_step, when resuming
        if resume_from_step and self.path.exists():
            # Drop records written after the checkpoint we resume from, so the file tells one consistent story.
            self.kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_from_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))
        elif not resume_from_step:
            write_text(self.path, "")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except Exception:  # tensorboard is optional: absent, or broken by its own dependencies
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk mostly; the checkpoints written so far are intact
            raise CheckpointWriteError(
                f"{self.path}: writing a record failed ({err.strerror or err}); the run stopped at step "
                f"{record.get('step', '?')} and the checkpoints written so far are intact; fix that and run the "
                "same command to resume") from None
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k not in ("step", "event") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{record.get('event', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A line that is not a JSON object (a write cut short by a kill or a full
    disk) is skipped with one warning naming the file and line."""
    records, bad = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        log.warning("qlorakit: %s: skipped %d unreadable line(s) (line %s%s; a write cut short)", path, len(bad),
                    bad[0], "" if len(bad) == 1 else f" .. {bad[-1]}")
    return records




def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    """Train and eval loss against step, saved to out_png (None if matplotlib is missing or nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("qlorakit: matplotlib is not installed; no loss plot written")
        return None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("event") == "eval"]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


class NoMetrics:
    """The metrics writer of ranks other than 0: records are dropped (rank 0 writes the same global values)."""

    kept: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
