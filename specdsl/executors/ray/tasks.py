"""The code that runs inside the Ray tasks: a chunk of rows through a row-parallel op, a chunk of
generation requests through the backend with each answer streamed back. Module-level, so workers import
them by reference."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Mapping

from specdsl.contract.hookspecs import GenRequest, GenResult
from specdsl.executors.ray.limits import SharedLimiterClient
from specdsl.executors.ray.transport import BackendByName, capture_error


def map_chunk(fn: Callable[[list[dict]], list[dict]], rows: list[dict]) -> tuple[str, Any]:
    try:
        return "ok", fn(rows)
    except BaseException as exc:  # noqa: BLE001 - travels back and is raised again in the driver
        return "error", capture_error(exc)


_DONE = object()
_MAX_BATCH = 256


def generate_chunk(backend: Any, options: Mapping[str, Any], requests: list[GenRequest],
                    limits: tuple[Any, int] | None = None):
    """Run ``backend.generate`` on a chunk; yield ("results", [GenResult, ...]) as answers arrive.

    The backend runs in a thread and hands results over a queue, so each one streams to the driver
    without waiting for the chunk to finish. A raised exception ends the stream with ("error", info).
    ``limits`` (the shared-limits actor and this task's holder number) replaces the backend's own limits.
    """
    answers: queue.Queue = queue.Queue()
    failure: list[dict] = []

    def work() -> None:
        client = None
        try:
            real = backend.resolve() if isinstance(backend, BackendByName) else backend
            if limits is not None:
                client = SharedLimiterClient(*limits)
                real = real.with_limiter(client)
            real.generate(options, requests, answers.put)
        except BaseException as exc:  # noqa: BLE001
            failure.append(capture_error(exc))
        finally:
            if client is not None:
                client.close()
            answers.put(_DONE)

    thread = threading.Thread(target=work, name="specdsl-generate", daemon=True)
    thread.start()
    finished = False
    while not finished:
        batch = [answers.get()]
        while len(batch) < _MAX_BATCH:
            try:
                batch.append(answers.get_nowait())
            except queue.Empty:
                break
        if batch[-1] is _DONE:
            batch.pop()
            finished = True
        results = [r for r in batch if isinstance(r, GenResult)]
        if results:
            yield "results", results
    thread.join()
    if failure:
        yield "error", failure[0]
