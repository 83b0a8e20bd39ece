"""Run a batch of generation requests through a backend, journaling each result as it arrives.

``run_requests`` is the resume point of every generation step: identical requests in a batch are sent
once, requests already answered in the journal are not sent at all, and every new answer is handed to a
:class:`~specdsl.execute.journal.JournalWriter` inside the backend's ``on_result`` callback, which
commits it at once while answers arrive slowly and in small groups when they arrive fast (one
transaction per few dozen answers, not per answer). Killing the process at any moment loses at most
the requests that were in flight plus the answers of the last ~10 ms; ``run_requests`` returns (or
raises) only once every answer is committed.

It is also where every failed request's error is redacted of the run's resolved secrets (the key, a
``${env:...}`` header), whatever the backend: nothing after it (the journal's failures table, the run
summary, run.json, report.html, a --fail-fast error) sees a message that quotes one.
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

from specdsl import secrets
from specdsl.errors import RunError
from specdsl.contract.hookspecs import GenerationBackend, GenRequest, GenResult
from specdsl.execute.journal import JournalWriter

NO_RESULT = "the backend returned no result for this request"


@dataclass(frozen=True)
class GenerationProgress:
    """Running totals after each result, for a progress bar (``done`` of ``total``).

    ``total`` counts distinct requests; ``cached`` of them were answered by the journal before the run
    started; ``done`` = cached + succeeded + failed. Tokens, cost and rate cover this run's requests
    only (cached answers cost nothing now).
    """

    total: int
    done: int
    cached: int
    succeeded: int
    failed: int
    input_tokens: int
    output_tokens: int
    cost: float
    elapsed_s: float
    requests_per_s: float
    last: GenResult | None = None  # the result that triggered this event (None for the first event)

    @property
    def remaining(self) -> int:
        return self.total - self.done


def run_requests(backend: GenerationBackend, options: Mapping, requests: Sequence[GenRequest],
                 journal, *, fail_fast: bool = False,
                 progress: Callable[[GenerationProgress], None] | None = None,
                 progress_interval_s: float | None = None) -> dict[str, GenResult]:
    """Answer ``requests`` with ``backend``, resuming from and writing to ``journal``.

    Returns a result for every distinct key in ``requests``: journaled, new, or failed (``error``
    set). With ``fail_fast`` the first failure raises :class:`RunError` once the backend has stopped;
    everything that completed before it is already journaled.

    ``progress`` gets an event before the first request and after every result; with
    ``progress_interval_s`` after a result at most once per that many seconds (``math.inf``: never),
    and always once more with the final totals when the backend is done. A display throttles this
    way so that it costs nothing per result (no event is built for the results it would not draw).
    """
    unique: dict[str, GenRequest] = {}
    for r in requests:
        unique.setdefault(r.key, r)  # equal keys mean equal requests: one answer serves them all
    cached = journal.get_many(unique.keys())
    todo = [r for k, r in unique.items() if k not in cached]
    results: dict[str, GenResult] = dict(cached)

    lock = threading.Lock()  # backends may call on_result from any thread
    t0 = time.monotonic()
    state = {"succeeded": 0, "failed": 0, "in": 0, "out": 0, "cost": 0.0}
    first_failure: list[GenResult] = []
    caller_errors: list[BaseException] = []
    todo_keys = {r.key for r in todo}
    known_secrets = secrets.resolved_secrets(options)  # value -> the variable it came from
    every_result = progress_interval_s is None
    # When the next event is due (the first one, before any result, was just shown), and the latest
    # result no event has shown yet.
    throttle = {"next": t0 + (progress_interval_s or 0.0), "stale": None}

    def event(last: GenResult | None) -> GenerationProgress:
        elapsed = time.monotonic() - t0
        new = state["succeeded"] + state["failed"]
        return GenerationProgress(
            total=len(unique), done=len(cached) + new, cached=len(cached),
            succeeded=state["succeeded"], failed=state["failed"], input_tokens=state["in"],
            output_tokens=state["out"], cost=state["cost"], elapsed_s=elapsed,
            requests_per_s=new / elapsed if elapsed > 0 else 0.0, last=last)

    def on_result(res: GenResult) -> None:
        if res.error is not None and known_secrets:
            res = replace(res, error=secrets.redact_values(res.error, known_secrets))
        with lock:
            if res.key not in todo_keys:
                return  # a key we did not ask for (a confused backend): never journal it
            if res.key in results and results[res.key].ok:
                return  # a duplicate callback for a key already answered
            writer.put(res)  # committed now, or with its group within milliseconds
            first = res.key not in results
            results[res.key] = res
            if res.ok:
                state["succeeded"] += 1
                state["in"] += res.input_tokens
                state["out"] += res.output_tokens
                state["cost"] += res.cost
            elif first:
                state["failed"] += 1
            ev = None
            if progress is not None:
                if every_result or _due(throttle, progress_interval_s):
                    ev, throttle["stale"] = event(res), None
                else:
                    throttle["stale"] = res
        if ev is not None:
            try:
                progress(ev)
            except BaseException as exc:
                caller_errors.append(exc)  # the caller's own bug: re-raised as is, not as a backend error
                raise
        if fail_fast and not res.ok:
            if not first_failure:
                first_failure.append(res)
            # Raising here asks the backend to stop sending; a backend that swallows it is caught below.
            # ``drain``: a backend that knows it still delivers the answers in flight (paid for) first,
            # and they are journaled above like any other.
            err = _fail_fast_error(res, unique[res.key])
            err.drain = True
            raise err

    def final_event() -> None:
        """The totals a throttled caller has not seen yet (its last event must hold them all)."""
        with lock:
            last, throttle["stale"] = throttle["stale"], None
            ev = event(last) if last is not None and not caller_errors else None
        if ev is not None:
            progress(ev)

    if progress is not None:
        progress(event(None))
    if todo:
        writer = JournalWriter(journal)
        try:
            with heap_frozen():
                backend.generate(options, todo, on_result)
        except RunError:
            _final_event_quietly(final_event)
            raise
        except Exception as exc:
            if caller_errors and exc is caller_errors[0]:
                raise
            _final_event_quietly(final_event)
            if first_failure:
                raise _fail_fast_error(first_failure[0], unique[first_failure[0].key]) from exc
            raise RunError(f"generation backend {getattr(backend, 'name', backend)!r} failed: "
                           f"{type(exc).__name__}: {secrets.excerpt(str(exc), known_secrets, 2000)}",
                           hint="a bug in the backend, or a fault it did not classify: rerun to resume (every "
                                "answer received is journaled)") from exc
        finally:
            writer.close()  # every answer received is durable before the caller hears of the outcome
        final_event()
    if first_failure:
        raise _fail_fast_error(first_failure[0], unique[first_failure[0].key])

    missing = [k for k in unique if k not in results]
    if missing:
        lost = [GenResult(key=k, error=NO_RESULT) for k in missing]
        journal.put_many(lost)
        for r in lost:
            results[r.key] = r
        if fail_fast:
            raise _fail_fast_error(lost[0], unique[lost[0].key])
    return {k: results[k] for k in unique}


def _due(throttle: dict, interval_s: float) -> bool:
    """Whether a throttled progress event is due now (and, if so, when the next one is)."""
    if interval_s == math.inf:
        return False
    now = time.monotonic()
    if now < throttle["next"]:
        return False
    throttle["next"] = now + interval_s
    return True


def _final_event_quietly(final_event: Callable[[], None]) -> None:
    """The final totals while a failure is on its way up: a failing progress callback must not hide it."""
    try:
        final_event()
    except Exception:  # noqa: BLE001 - the failure being raised is the one the user needs to see
        pass


_freeze_lock = threading.Lock()
_freezes = 0  # run_requests calls inside heap_frozen now (threads may run several at once)
_raised = 0  # callers inside young_collections_rarer now
_thresholds: tuple[int, ...] = ()  # the collector's thresholds before the first of them

# How many allocations the young generation collects after, during a run or a batch, instead of
# CPython's 700. During a batch that generation holds every request in flight (~30 objects each:
# coroutines, futures, headers, timer handles; ~7,000 at concurrency 256), so at 700 each young
# collection walks them all again, every few dozen answers, and promotes them to be walked again by the
# middle generation: 0.9 s of collector CPU in a 20,000-request run at concurrency 256, against 0.2 s
# (measured; peak RSS unchanged). Before it, building a row and a request per input row set off three
# full collections of the whole heap (0.1 s; none now). Garbage in reference cycles waits for at most
# this many allocations (a few MB).
BATCH_GC_THRESHOLD = 20_000


@contextlib.contextmanager
def young_collections_rarer():
    """The young generation collects every :data:`BATCH_GC_THRESHOLD` allocations meanwhile (see there);
    the thresholds are put back when the last of the nested or concurrent callers leaves. A collector
    that is off (threshold 0) or already rarer is left alone."""
    global _raised, _thresholds
    with _freeze_lock:
        if _raised == 0:
            _thresholds = gc.get_threshold()
            if _thresholds[0] and _thresholds[0] < BATCH_GC_THRESHOLD:
                gc.set_threshold(BATCH_GC_THRESHOLD, *_thresholds[1:])
        _raised += 1
    try:
        yield
    finally:
        with _freeze_lock:
            _raised -= 1
            if _raised == 0:
                gc.set_threshold(*_thresholds)


@contextlib.contextmanager
def heap_frozen():
    """Keep the garbage collector off the objects that exist before a batch of requests is sent, and off
    the requests in flight.

    Everything built before the batch (the rows, the requests, the plan, every imported module) lives
    through it, yet a long batch allocates enough (each answer, its result, its HTTP objects) to trigger
    full collections, each walking that whole heap again. ``gc.freeze`` sets those objects aside for
    the batch (objects made during it are collected as usual) and ``gc.unfreeze`` hands them back when
    the last concurrent batch ends, so a cycle among them is collected by the next full collection
    after it. A heap someone else froze is left alone. The young generation collects rarely meanwhile
    (:func:`young_collections_rarer`).
    """
    global _freezes
    with _freeze_lock:
        ours = _freezes > 0 or gc.get_freeze_count() == 0
        if ours:
            if _freezes == 0:
                gc.freeze()
            _freezes += 1
    try:
        with young_collections_rarer():
            yield
    finally:
        if ours:
            with _freeze_lock:
                _freezes -= 1
                if _freezes == 0:
                    gc.unfreeze()


def _fail_fast_error(res: GenResult, req: GenRequest) -> RunError:
    who = f"row {req.row_id}" if req.row_id else f"request {req.key[:12]}"
    return RunError(f"generation failed for {who}: {res.error}",
                    hint="completed answers are journaled; rerun to resume, or drop fail_fast to "
                         "collect every failure")
