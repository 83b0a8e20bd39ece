"""What ops get from the executor while they run: models, tokenizers, journaled generation, training.

Ops never talk to backends directly: going through here is what makes every request journaled,
deduplicated and shown in the progress display, and every trained model land in the store.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from specdsl.errors import RunError
from specdsl.contract.hookspecs import GenRequest, GenResult
from specdsl.ir.plan import Plan
from specdsl import secrets
from specdsl.execute.progress import UPDATES_PER_S, Throttle
from specdsl.execute.store import Store


@dataclass
class NodeStats:
    requests: int = 0
    cached_requests: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    cost_unknown: bool = False  # a model the backend cannot price answered: the cost is unknown, not 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "cached_requests": self.cached_requests, "failed": self.failed,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cost": None if self.cost_unknown else round(self.cost, 6), "errors": self.errors[:20]}


SHOWN_ROWS = 3  # rows named per distinct error message


class ErrorGroups:
    """Failed rows grouped by message as they come: a server that is down fails 10,000 rows with one
    message, shown once with a count and the first rows, not 10,000 times. Holds a count and the first
    few rows per message, never every failed row."""

    def __init__(self) -> None:
        self._groups: dict[str, tuple[int, list[str]]] = {}

    def add(self, row: str, message: str) -> None:
        count, rows = self._groups.get(message, (0, []))
        if len(rows) < SHOWN_ROWS:
            rows.append(row)
        self._groups[message] = (count + 1, rows)

    def lines(self) -> list[str]:
        out = []
        for message, (count, rows) in self._groups.items():
            if count == 1:
                out.append(f"row {rows[0]}: {message}")
            else:
                more = f" and {count - SHOWN_ROWS} more" if count > SHOWN_ROWS else ""
                out.append(f"{count} rows ({', '.join(rows)}{more}): {message}")
        return out


def grouped_errors(failures: Sequence[tuple[str, str]]) -> list[str]:
    """``(row, message)`` pairs as one line per distinct message (see :class:`ErrorGroups`)."""
    groups = ErrorGroups()
    for row, message in failures:
        groups.add(row, message)
    return groups.lines()


def _priced(backend: Any, options: Mapping[str, Any]) -> bool:
    try:
        return backend.price(options, 1, 1) is not None
    except Exception:
        return False


class Services:
    def __init__(self, plan: Plan, store: Store, registry: Any, *, executor: Any, progress: Any = None,
                 fail_fast: bool = False, journal: Any = None):
        # ``executor`` (an ExecutorDef: generation and row chunks go through it) is the caller's choice,
        # usually ``registry.executors[name]``: the executor core never imports specdsl.executors.
        self.plan = plan
        self.store = store
        self.registry = registry
        self.progress = progress            # specdsl.execute.progress.Display or None
        self.fail_fast = fail_fast
        self._journal = journal
        self._owns_journal = False  # a journal given by the caller is the caller's to close
        self.executor = executor
        self._tokenizers: dict[str, Any] = {}
        self.notes: dict[str, list[str]] = {}
        self.stats: dict[str, NodeStats] = {}
        self._lock = threading.Lock()

    # -- models ---------------------------------------------------------------------------------------

    @property
    def journal(self):
        if self._journal is None:
            from specdsl.execute.journal import RequestJournal

            self._journal = RequestJournal(self.store.journal_path)
            self._owns_journal = True
        return self._journal

    def close(self) -> None:
        """Close the journal this opened (one given to it is its caller's): the close checkpoints the
        journal, so ``journal.sqlite`` alone holds every answer and its ``-wal`` file is gone."""
        if self._journal is not None and self._owns_journal:
            self._journal.close()
            self._journal, self._owns_journal = None, False

    def _model_backend_of_step(self, ref: str) -> str | None:
        """The backend serving the model a step makes (its op's ``model_backend``); None if it makes none."""
        if not self.plan.has(ref):
            return None
        return getattr(self.registry.ops.get(self.plan.node(ref).op), "model_backend", None)

    def is_trained(self, ref: str) -> bool:
        return self._model_backend_of_step(ref) is not None

    def trained_dir(self, ref: str) -> Path:
        node = self.plan.node(ref)
        if not self.store.has(node.fingerprint):
            raise RunError(f"model '{ref}' has not been trained yet", hint=f"run the plan up to '{ref}' first")
        meta = self.store.meta(node.fingerprint)
        return self.store.node_dir(node.fingerprint) / meta.get("model_dir", "model")

    def backend_and_options(self, ref: str) -> tuple[Any, dict[str, Any]]:
        """The generation backend for a model ref and its options (secrets still references)."""
        if self.is_trained(ref):
            train = self.plan.node(ref)
            base = train.params.get("model")
            backend_name, options = self._model_backend_of_step(ref), {}
            try:
                m = self.plan.model(base)
                if m.backend == backend_name:  # the trained model decodes like its base
                    options = {k: v for k, v in m.options.items() if k != "model"}
            except KeyError:
                pass
            options["model"] = str(self.trained_dir(ref))
            return self.registry.backends[backend_name], options
        m = self.plan.model(ref)
        return self.registry.backends[m.backend], m.options

    def model_identity(self, ref: str) -> dict[str, Any]:
        """What decides a model's outputs (the request key hashes it); a trained model is its fingerprint."""
        if self.is_trained(ref):
            backend, options = self.backend_and_options(ref)
            decoding = {k: v for k, v in options.items() if k != "model"}
            return {"trained": self.plan.node(ref).fingerprint, "decoding": decoding}
        return json.loads(self.plan.model(ref).identity_json)

    def model_dir(self, ref: str) -> Path:
        """A local Hugging Face directory for a model ref (declared transformers model or trained step)."""
        if self.is_trained(ref):
            return self.trained_dir(ref)
        m = self.plan.model(ref)
        backend = self.registry.backends.get(m.backend)
        local_dir = getattr(backend, "model_dir", None)  # backends that run models from a local folder
        if not callable(local_dir):
            local = sorted(name for name, b in self.registry.backends.items() if callable(getattr(b, "model_dir", None)))
            raise RunError(f"model '{ref}' is served by '{m.backend}'; this step needs a local model",
                           hint=f"use a model of a local backend ({', '.join(local) or 'none installed'}): "
                                "a known name or a local directory")
        return Path(local_dir(m.options))

    def tokenizer(self, ref: str):
        from specdsl.execute.row_services import read_fast_tokenizer

        path = self.model_dir(ref)
        if str(path) not in self._tokenizers:
            self._tokenizers[str(path)] = read_fast_tokenizer(Path(path), ref)
        return self._tokenizers[str(path)]

    # -- generation -----------------------------------------------------------------------------------

    def generate(self, node_id: str, model_ref: str, requests: Sequence[GenRequest], *,
                 label: str | None = None) -> dict[str, GenResult]:
        """Answer requests through the journal: completed ones are never re-issued, new ones persist at once.

        ``label`` names the progress bar after the node (default: the model); evaluate passes its probe and
        condition, so two bars of one node never read the same."""
        with self.generation(node_id, model_ref, label=label) as session:
            return session.answer(requests)

    def generation(self, node_id: str, model_ref: str, *, label: str | None = None) -> "GenerationSession":
        """A node's requests to one model answered in several calls (a window of rows at a time) behind one
        progress bar and one set of totals: see :class:`GenerationSession`. Use it as a context manager."""
        return GenerationSession(self, node_id, model_ref, label)

    def _start_bar(self, name: str, total: int | None, unit: str) -> int | None:
        """A progress bar, or None when there is no display or it is off (then nobody updates anything)."""
        return self.progress.start(name, total=total, unit=unit) if self.progress is not None else None

    def answer(self, node_id: str, model_ref: str, prompts: Sequence[Sequence[Mapping[str, str]]],
               params: Mapping[str, Any] | None = None, *, label: str | None = None) -> list[str]:
        """Plain chat completions for evaluation probes (journaled like any other request); ``label``
        names the progress bar (see :meth:`generate`)."""
        from specdsl.contract.hookspecs import request_key

        params = dict(params or {"temperature": 0})
        identity = self.model_identity(model_ref)
        reqs = [GenRequest(key=request_key(identity, list(p), params), messages=tuple(p), params=params,
                           row_id=str(i)) for i, p in enumerate(prompts)]
        results = self.generate(node_id, model_ref, reqs, label=label)
        return [(results[r.key].text or "") if results.get(r.key) is not None else "" for r in reqs]

    def note(self, node_id: str, message: str) -> None:
        """Something the user should know about a node's output (rows skipped, and why)."""
        self.notes.setdefault(node_id, []).append(message)
        if self.progress is not None:
            self.progress.log(f"[yellow]{node_id}: {message}[/yellow]")

    # -- training -------------------------------------------------------------------------------------

    def training_target(self, name: str):
        """The target a train step asked for; ``auto``: the first available one, in registration order (the
        built-in plugin registers cuda before cpu, and loads before third-party plugins)."""
        targets = self.registry.targets
        if name == "auto":
            for target in targets.values():
                if target.available():
                    return target
            raise RunError("no training target is available on this machine",
                           hint=f"registered: {', '.join(sorted(targets)) or 'none'}")
        if name not in targets:
            raise RunError(f"unknown training target '{name}'", hint=f"installed: {', '.join(sorted(targets))}")
        target = targets[name]
        if not target.available():
            raise RunError(f"training target '{name}' is not available on this machine",
                           hint="use `target: auto` to pick what is available")
        return target

    def progress_callback(self, node_id: str, total: int | None = None, unit: str = "step", *,
                          label: str | None = None) -> Callable[[Mapping[str, Any]], None]:
        """A progress function for long work an op drives itself (training: one event per optimizer step).
        Events are drawn at most ~10 times a second, the last one always; nothing at all when progress is off."""
        task = self._start_bar(f"{node_id} · {label}" if label else node_id, total, unit)
        if task is None:
            return lambda event: None
        throttle = Throttle()

        def update(event: Mapping[str, Any]) -> None:
            done, total_ = event.get("done", event.get("step")), event.get("total")
            if throttle.due() or (done is not None and done == total_):
                self.progress.update(task, event)

        return update


class GenerationSession:
    """One node's generation on one model, answered a window of requests at a time.

    Each :meth:`answer` is a :func:`~specdsl.execute.generation.run_requests` call (journaled, resumable,
    deduplicated within the window; a repeat in a later window is answered by the journal). The session
    keeps what the windows share: one progress bar whose counts and tokens run on across windows, and
    whose total is the requests seen so far plus the caller's count of those still to come
    (``remaining``), exact once the last window is known; and the node's totals and grouped errors,
    added to its :class:`NodeStats` when the session closes.
    """

    def __init__(self, services: Services, node_id: str, model_ref: str, label: str | None):
        self.services, self.node_id, self.model_ref = services, node_id, model_ref
        self.backend, options = services.backend_and_options(model_ref)
        self.options = secrets.resolve(options, model=model_ref)
        self.name = f"{node_id} · {label or model_ref}"
        self.task: int | None = None
        self.started = False
        # What earlier windows counted: shown under this window's counts on the one bar.
        self.before = {"total": 0, "done": 0, "cached": 0, "failed": 0, "input_tokens": 0, "output_tokens": 0,
                       "cost": 0.0}
        self.errors = ErrorGroups()
        self.failed = 0  # distinct requests without an answer (a lost one too, which no event counts)
        self.asked = False  # some window had requests (an unpriced backend then makes the cost unknown)

    def __enter__(self) -> "GenerationSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def answer(self, requests: Sequence[GenRequest], *, remaining: int = 0) -> dict[str, GenResult]:
        """Answer one window; ``remaining``: how many requests later windows will bring (at most)."""
        from specdsl.execute.generation import run_requests

        services = self.services
        if not self.started:
            self.started = True
            self.task = services._start_bar(self.name, len(requests) + remaining, "req")
        last: list[Any] = [None]

        def on_progress(event: Any) -> None:
            # run_requests throttles: at most ~10 events a second while a bar is drawn, only the first and
            # the last (the totals) when none is, and no event is built for the results in between.
            last[0] = event
            if self.task is not None:
                self._show(event, remaining)

        try:
            results = run_requests(services.executor.wrap_backend(self.backend), self.options, list(requests),
                                   services.journal, fail_fast=services.fail_fast, progress=on_progress,
                                   progress_interval_s=1.0 / UPDATES_PER_S if self.task is not None else math.inf)
        finally:
            if last[0] is not None:
                ev = last[0]
                if self.task is not None:
                    self._show(ev, remaining)
                for name in ("total", "done", "cached", "failed", "input_tokens", "output_tokens", "cost"):
                    self.before[name] += getattr(ev, name)
        rows_of: dict[str, str] = {}
        for r in requests:
            rows_of.setdefault(r.key, r.row_id or r.key[:12])
        # Errors come redacted of the resolved secrets from run_requests (the one place that does it).
        for key, res in results.items():
            if not res.ok:
                self.failed += 1
                self.errors.add(rows_of.get(key, key[:12]), str(res.error))
        self.asked = self.asked or bool(requests)
        return results

    def _show(self, event: Any, remaining: int) -> None:
        b = self.before
        self.services.progress.update(self.task, {
            "done": b["done"] + event.done, "total": b["total"] + event.total + remaining,
            "failed": b["failed"] + event.failed, "cached": b["cached"] + event.cached,
            "input_tokens": b["input_tokens"] + event.input_tokens,
            "output_tokens": b["output_tokens"] + event.output_tokens, "cost": b["cost"] + event.cost})

    def close(self) -> None:
        """Finish the bar and add the session's totals to the node's stats (also after a failure: what
        was answered was paid for)."""
        services = self.services
        if self.task is not None:
            services.progress.finish(self.task)
            self.task = None
        b = self.before
        with services._lock:
            stats = services.stats.setdefault(self.node_id, NodeStats())
            stats.requests += b["total"]
            stats.cached_requests += b["cached"]
            stats.input_tokens += b["input_tokens"]
            stats.output_tokens += b["output_tokens"]
            stats.cost += b["cost"]
            if self.asked and not _priced(self.backend, self.options):
                stats.cost_unknown = True
            stats.failed += self.failed
            stats.errors.extend(self.errors.lines())
        self.before = dict.fromkeys(b, 0)
        self.errors, self.failed = ErrorGroups(), 0
