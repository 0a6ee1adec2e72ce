"""What `qlorakit eval` measured: one column per model, one row per metric; printed as a table, written as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .eval_data import DataLoss


@dataclass
class ModelColumn:
    """One model's results: data loss (when asked), harness scores per task (task_scores' layout), and samples."""

    name: str
    spec: str
    folder: str
    adapter: str | None
    precision: str
    load_seconds: float = 0.0
    eval_seconds: float = 0.0
    data: DataLoss | None = None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, list[dict[str, Any]]] | None = None

    def header(self) -> str:
        """The precision the model ran in, with '+ adapter' when it has one: the table's second header line."""
        return self.precision + (" + adapter" if self.adapter else "")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "folder": self.folder, "adapter": self.adapter,
                               "precision": self.precision, "load_seconds": round(self.load_seconds, 2),
                               "eval_seconds": round(self.eval_seconds, 2)}
        if self.data is not None:
            out["data"] = self.data.to_json()
        if self.tasks:
            out["tasks"] = self.tasks
        if self.samples is not None:
            out["samples"] = self.samples
        return out


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


@dataclass
class EvalReport:
    """Every column, what was evaluated, where, and how long the whole command took."""

    columns: list[ModelColumn]
    data_label: str | None
    task_names: list[str]
    settings: dict[str, Any]
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, list[str]]]:
        """(row label, one cell per column): the data rows, then each task's metrics, in the harness's order."""
        rows: list[tuple[str, list[str]]] = []
        if self.data_label is not None:
            rows.append((f"data: {self.data_label}", [""] * len(self.columns)))
            for key, digits in (("loss", 4), ("ppl", 3), ("tokens", 0), ("examples", 0)):
                rows.append((f"  {key}", [_number(getattr(c.data, key), digits) if c.data else "-"
                                          for c in self.columns]))
        tasks = list(dict.fromkeys(t for c in self.columns for t in c.tasks))
        for task in tasks:
            counts = {c.tasks.get(task, {}).get("n") for c in self.columns} - {None}
            items = f" ({counts.pop()} items)" if len(counts) == 1 else ""
            rows.append((f"{task}{items}", [""] * len(self.columns)))
            metrics = list(dict.fromkeys(m for c in self.columns for m in c.tasks.get(task, {})
                                         if m != "n" and not m.endswith("_stderr")))
            for metric in metrics:
                cells = []
                for c in self.columns:
                    scores = c.tasks.get(task, {})
                    value, err = scores.get(metric), scores.get(f"{metric}_stderr")
                    cells.append(_number(value) + (f" ± {err:.4f}" if isinstance(err, (int, float)) else ""))
                rows.append((f"  {metric}", cells))
        return rows

    def table(self) -> str:
        """Plain text: the models' names and precisions as the header, a row per metric."""
        head = [("", [c.name for c in self.columns]), ("", [c.header() for c in self.columns])]
        rows = head + self.rows()
        first = max(len(label) for label, _ in rows)
        widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(self.columns))]

        def line(label: str, cells: list[str]) -> str:
            return "  ".join([f"{label:<{first}}"] + [f"{cell:>{w}}" for cell, w in zip(cells, widths)]).rstrip()

        lines = [line(label, cells) for label, cells in head]
        lines.append("-" * len(line("", ["-" * w for w in widths])))
        lines += [line(label, cells) for label, cells in rows[len(head):]]
        lines += [f"{c.name}: {c.spec}" for c in self.columns if c.spec != c.name]
        lines.append(f"{self.settings.get('device', '?')}, compute {self.settings.get('compute_dtype', '?')}; "
                     f"{self.seconds:.0f} s in all")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "data": self.data_label, "tasks": self.task_names,
                "seconds": round(self.seconds, 1), "models": {c.name: c.to_json() for c in self.columns}}
