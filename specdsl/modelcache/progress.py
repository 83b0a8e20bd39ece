"""The progress display of a pull (rich, on stderr): named steps with a spinner, byte bars for file work."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator


def console():
    from rich.console import Console

    # stderr: stdout may be a pipe carrying data (`specdsl plan --json`, ...).
    return Console(stderr=True)


class Steps:
    """A thin layer over rich's Progress: named steps with a spinner, byte bars for file work."""

    def __init__(self, progress: Any | None):
        self._p = progress

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self._p is None:
            yield
            return
        task = self._p.add_task(description, total=None)
        try:
            yield
        finally:
            self._p.update(task, total=1, completed=1)

    def bar(self, description: str, total: int) -> Callable[[int], None]:
        if self._p is None:
            return lambda n: None
        task = self._p.add_task(description, total=total, bytes=True)
        return lambda n: self._p.advance(task, n)


@contextlib.contextmanager
def progress_display(quiet: bool) -> Iterator[Steps]:
    if quiet:
        yield Steps(None)
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)
    from rich.text import Text

    class _BytesColumn(DownloadColumn):
        # Only byte-counting tasks show "12.3/98.4 MB"; spinner steps show nothing there.
        def render(self, task):
            return super().render(task) if task.fields.get("bytes") else Text("")

    class _Bar(BarColumn):
        def render(self, task):
            return super().render(task) if task.fields.get("bytes") else Text("")

    with Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"),
                  _Bar(), _BytesColumn(), TimeElapsedColumn(),
                  console=console()) as p:
        yield Steps(p)
