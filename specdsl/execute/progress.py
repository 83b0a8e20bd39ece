"""The live display of a run: what each running node is doing, wherever the output goes.

Three modes, chosen once per run (:func:`choose_mode`):

* ``live``: rich progress bars on stderr, when both stdout and stderr are terminals.
* ``lines``: plain timestamped lines (CI logs, ``| tee``, ``| cat``, ``2> log``): one when a node starts
  and ends, and one per running bar every ``interval_s`` seconds, whole names, never cut to a width.
  They go to stdout when stdout is not a terminal (so ``specdsl run spec | tee log`` keeps them),
  else to stderr.
* ``off`` (``--no-progress``): nothing is drawn and :meth:`Display.start` hands out no task, so callers
  skip their updates altogether.

Bars are named by their caller (``node · model · condition``). The rate and the ETA come from what was
observed since the bar's first event (the cached part of a resumed run does not count as speed), and
no ETA is shown before there is a rate. Callers that get an event per result throttle with
:class:`Throttle`: the display is updated at most ~10 times a second.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Mapping

UPDATES_PER_S = 10          # the most a caller should update a bar (see Throttle)
LINE_INTERVAL_S = 10.0      # lines mode: a line per running bar this often (SPECDSL_PROGRESS_INTERVAL_S)


class Throttle:
    """``due()`` is true at most once per ``interval_s`` (and on the first call). Races are harmless: a
    second thread that slips through only draws one more update."""

    def __init__(self, interval_s: float = 1.0 / UPDATES_PER_S):
        self.interval_s = interval_s
        self._next = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        return True


def choose_mode(enabled: bool, stdout: Any = None, stderr: Any = None) -> str:
    if not enabled:
        return "off"
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    return "live" if _isatty(stdout) and _isatty(stderr) else "lines"


def line_interval_s() -> float:
    """Seconds between progress lines: SPECDSL_PROGRESS_INTERVAL_S when set to a positive number."""
    try:
        value = float(os.environ.get("SPECDSL_PROGRESS_INTERVAL_S", ""))
    except ValueError:
        return LINE_INTERVAL_S
    return value if value > 0 else LINE_INTERVAL_S


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Bar:
    """One bar's state: what it counts and what has been seen of it."""

    name: str
    total: int | None
    unit: str
    started: float = field(default_factory=time.monotonic)
    done: int | None = None
    event: Mapping[str, Any] = field(default_factory=dict)
    first: tuple[float, int] | None = None     # (time, done) of the first event that had a count
    finished: bool = False

    def observe(self, event: Mapping[str, Any]) -> None:
        done = event.get("done", event.get("step"))
        if event.get("total") is not None:
            self.total = int(event["total"])
        if done is not None:
            self.done = int(done)
            if self.first is None:
                self.first = (time.monotonic(), self.done)
        self.event = event

    def rate(self) -> float | None:
        """Units per second since the first counted event (None until something was counted after it)."""
        if self.first is None or self.done is None or self.done <= self.first[1]:
            return None
        elapsed = time.monotonic() - self.first[0]
        return (self.done - self.first[1]) / elapsed if elapsed > 0 else None

    def eta_s(self) -> float | None:
        rate = self.rate()
        if rate is None or not rate or self.total is None or self.done is None:
            return None
        return max(self.total - self.done, 0) / rate

    def details(self) -> str:
        """Rate, ETA and what the event carries (tokens, cost, failures, loss), as plain text."""
        e, parts = self.event, []
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 0.1 else f"{1 / rate:.1f} s/{self.unit}")
        if e.get("loss") is not None:
            parts.append(f"loss {e['loss']:.4f}")
        if e.get("learning_rate") is not None:
            parts.append(f"lr {e['learning_rate']:.2e}")
        if e.get("tokens_per_s"):
            parts.append(f"{e['tokens_per_s']:,.0f} tok/s")
        if e.get("input_tokens") or e.get("output_tokens"):
            parts.append(f"{e.get('input_tokens', 0):,}+{e.get('output_tokens', 0):,} tok")
        if e.get("cost"):
            parts.append(f"${e['cost']:.4f}")
        if e.get("cached"):
            parts.append(f"{e['cached']} cached")
        if e.get("failed"):
            parts.append(f"{e['failed']} failed")
        return "  ".join(parts)

    def count(self) -> str:
        done = "?" if self.done is None else f"{self.done:,}"
        return f"{done}/{self.total:,} {self.unit}" if self.total is not None else f"{done} {self.unit}"

    def line(self) -> str:
        """The bar as one plain line (lines mode)."""
        elapsed = format_duration(time.monotonic() - self.started)
        eta = self.eta_s()
        parts = [self.name, self.count(), self.details(), f"elapsed {elapsed}"]
        if not self.finished and eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        return "  ".join(p for p in parts if p)


class Display:
    """Progress of a run's nodes (see the module docstring for the modes). ``start`` returns a task id, or
    None when progress is off; ``update`` takes an event (``done``/``step``, ``total`` and what else the
    caller knows); ``finish`` completes the bar; ``log`` prints a message above the bars."""

    def __init__(self, console: Any = None, enabled: bool = True, *, mode: str | None = None,
                 stream: IO[str] | None = None, interval_s: float | None = None):
        self.mode = mode or choose_mode(enabled)
        self.enabled = self.mode != "off"
        self.interval_s = interval_s if interval_s is not None else line_interval_s()
        self.updates = 0            # bar updates drawn (callers throttle; see Throttle)
        self._bars: dict[int, Bar] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._console = console
        self._progress = None
        if self.mode == "lines":
            self._stream = stream or (sys.stdout if not _isatty(sys.stdout) else sys.stderr)
        elif self.mode == "live":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._console = console or Console(stderr=True)
            self._progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[details]}"), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                console=self._console, transient=False)

    # -- lifetime ---------------------------------------------------------------------------------------

    def __enter__(self) -> "Display":
        if self._progress is not None:
            self._progress.start()
        elif self.mode == "lines":
            self._ticker = threading.Thread(target=self._tick, name="specdsl-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=1)
        if self._progress is not None:
            self._progress.stop()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                lines = [bar.line() for bar in self._bars.values() if not bar.finished]
            for text in lines:
                self._write(text)

    # -- nodes ------------------------------------------------------------------------------------------

    def node_started(self, node_id: str, op: str) -> None:
        if self.mode == "lines":
            self._write(f"{node_id} ({op}): started")

    def node_finished(self, node_id: str, status: str, rows: int | None, seconds: float) -> None:
        if self.mode == "lines":
            rows_text = "" if rows is None else f", {rows:,} rows"
            self._write(f"{node_id}: {status}{rows_text} in {format_duration(seconds)}")

    # -- bars -------------------------------------------------------------------------------------------

    def start(self, name: str, total: int | None, unit: str = "row") -> int | None:
        if self.mode == "off":
            return None
        with self._lock:
            task = len(self._bars)
            self._bars[task] = Bar(name, total, unit)
        if self._progress is not None:
            self._progress.add_task(name, total=total, details="", eta="")
        else:
            self._write(f"{name}: started" + (f", {total:,} {unit}" if total is not None else ""))
        return task

    def update(self, task: int | None, event: Mapping[str, Any]) -> None:
        bar = self._bars.get(task) if task is not None else None
        if bar is None:
            return
        with self._lock:
            bar.observe(event)
            self.updates += 1
        if self._progress is not None:
            eta = bar.eta_s()
            kwargs: dict[str, Any] = {"details": bar.details(), "eta": f"eta {format_duration(eta)}" if eta else ""}
            if bar.done is not None:
                kwargs["completed"] = bar.done
            if bar.total is not None:
                kwargs["total"] = bar.total
            self._progress.update(task, **kwargs)

    def finish(self, task: int | None) -> None:
        bar = self._bars.get(task) if task is not None else None
        if bar is None or bar.finished:
            return
        with self._lock:
            bar.finished = True
        if self._progress is not None:
            if bar.total is not None:
                self._progress.update(task, completed=bar.total, eta="")
        else:
            self._write(f"{bar.line()}  (finished)")

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        elif self.mode == "lines":
            self._write(_strip_markup(message))
        else:  # progress off: notes are still worth a line on stderr
            if self._console is None:
                from rich.console import Console

                self._console = Console(stderr=True)
            self._console.print(message)

    def _write(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        try:
            self._stream.write(f"{stamp} {text}\n")
            self._stream.flush()  # a pipe is block-buffered: without this, nothing shows until the run ends
        except (OSError, ValueError):  # a closed pipe must not fail the run
            pass


_MARKUP = re.compile(r"\[/?[a-z][a-z0-9 _#.-]*\]")


def _strip_markup(text: str) -> str:
    return _MARKUP.sub("", text)
