"""Reporting probe results: rows shaped like the paper's Table 1, a plain-text table, and a PNG of
accuracy against relative position."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from specdsl.probes.position.items import PositionResult
from specdsl.probes.position.scoring import combine_position_results

ResultsByModel = Mapping[str, "PositionResult | Mapping[str, PositionResult]"]


def _by_task(results: ResultsByModel) -> dict[str, dict[str, PositionResult]]:
    """Normalize ``{label: result}`` and ``{label: {task: result}}`` to the nested form."""
    nested: dict[str, dict[str, PositionResult]] = {}
    for label, value in results.items():
        if isinstance(value, PositionResult):
            nested[label] = {value.task: value}
        else:
            nested[label] = dict(value)
    return nested


def results_table(results: ResultsByModel, *, digits: int = 1) -> list[dict[str, object]]:
    """Rows shaped like the paper's Table 1: one per model, ``<task> avg`` and ``<task> gap`` columns,
    plus ``all avg``/``all gap`` (mean of averages, mean of gaps) when a model has several tasks.

    ``results`` is ``{label: PositionResult}`` or ``{label: {task: PositionResult}}``. Values are
    rounded to ``digits``; a missing task is None.
    """
    nested = _by_task(results)
    tasks = list(dict.fromkeys(task for per_task in nested.values() for task in per_task))
    rows = []
    for label, per_task in nested.items():
        row: dict[str, object] = {"model": label}
        for task in tasks:
            result = per_task.get(task)
            row[f"{task} avg"] = None if result is None else round(result.avg, digits)
            row[f"{task} gap"] = None if result is None else round(result.gap, digits)
            interval = result.intervals().get("gap_ci95") if result is not None else None
            if interval is not None:  # scored from items: the gap's 95% bootstrap interval
                row[f"{task} gap 95%"] = f"{interval[0]:.{digits}f}-{interval[1]:.{digits}f}"
        if len(tasks) > 1:
            present = [per_task[t] for t in tasks if t in per_task]
            overall = combine_position_results(present)
            row["all avg"] = round(overall.avg, digits)
            row["all gap"] = round(overall.gap, digits)
        rows.append(row)
    return rows


def plot_position_results(results: ResultsByModel, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG of accuracy against relative position, one panel per task, one line per model.

    ``results`` is ``{label: PositionResult}`` or ``{label: {task: PositionResult}}``. Uses matplotlib's
    object API with the Agg canvas, so no global backend or pyplot state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nested = _by_task(results)
    tasks = list(dict.fromkeys(task for per_task in nested.values() for task in per_task))
    if not tasks:
        raise ValueError("no results to plot")
    figure = Figure(figsize=(5.5 * len(tasks), 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for label, per_task in nested.items():
            result = per_task.get(task)
            if result is None:
                continue
            n = result.n_buckets
            x = [100.0 * (b + 0.5) / n for b in range(n)]
            intervals = result.intervals().get("per_bucket_ci95")
            label_text = f"{label} (avg {result.avg:.1f}, gap {result.gap:.1f})"
            if intervals and all(i is not None for i in intervals):
                # 95% interval error bars, so a dip within the noise of a few items reads as such.
                below = [max(0.0, v - i[0]) for v, i in zip(result.per_bucket, intervals)]
                above = [max(0.0, i[1] - v) for v, i in zip(result.per_bucket, intervals)]
                ax.errorbar(x, list(result.per_bucket), yerr=[below, above], marker="o", linewidth=2, capsize=3,
                            label=label_text)
            else:
                ax.plot(x, list(result.per_bucket), marker="o", linewidth=2, label=label_text)
        ax.set_title(task)
        ax.set_xlim(0, 100)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("relative position of the target in the context (%)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
