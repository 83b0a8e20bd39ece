"""The live display of a run: one rich progress bar per running node, and the summary table after."""

from __future__ import annotations

import time
from typing import Any, Mapping


class Display:
    """Progress bars (rows or requests done/total, rate, tokens, cost, ETA). Quiet when not a terminal."""

    def __init__(self, console: Any = None, enabled: bool = True):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self._progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[extra]}"), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=self.console, disable=not enabled, transient=False,
        )
        self._started: dict[int, float] = {}

    def __enter__(self) -> "Display":
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def start(self, name: str, total: int | None, unit: str = "row") -> int:
        task = self._progress.add_task(name, total=total, rate="", extra="", unit=unit)
        self._started[task] = time.monotonic()
        return task

    def update(self, task: int, event: Mapping[str, Any]) -> None:
        done = event.get("done", event.get("step"))
        total = event.get("total")
        elapsed = max(time.monotonic() - self._started.get(task, time.monotonic()), 1e-6)
        extra = []
        if event.get("input_tokens") or event.get("output_tokens"):
            extra.append(f"{event.get('input_tokens', 0):,}+{event.get('output_tokens', 0):,} tok")
        if event.get("cost"):
            extra.append(f"${event['cost']:.4f}")
        if event.get("failed"):
            extra.append(f"[red]{event['failed']} failed[/red]")
        if event.get("cached"):
            extra.append(f"{event['cached']} cached")
        if event.get("loss") is not None:
            extra.append(f"loss {event['loss']:.4f}")
        rate = ""
        if done:
            unit = self._progress.tasks[task].fields.get("unit", "it") if task < len(self._progress.tasks) else "it"
            rate = f"{event.get('rate', done / elapsed):.1f} {unit}/s"
        kwargs: dict[str, Any] = {"rate": rate, "extra": " ".join(extra)}
        if done is not None:
            kwargs["completed"] = done
        if total is not None:
            kwargs["total"] = total
        self._progress.update(task, **kwargs)

    def finish(self, task: int) -> None:
        t = self._progress.tasks[task] if task < len(self._progress.tasks) else None
        if t is not None and t.total is not None:
            self._progress.update(task, completed=t.total)

    def log(self, message: str) -> None:
        self._progress.console.print(message)
