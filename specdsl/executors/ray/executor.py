"""The executor and its generation backend wrapper, on the driver: chunking, submitting at most a window
of tasks, collecting results in order, cancelling what nobody will record. See :mod:`specdsl.executors.ray`."""

from __future__ import annotations

import math
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from specdsl.errors import RunError
from specdsl.contract.hookspecs import GenRequest, GenResult
from specdsl.executors.ray.connect import (ENV_MAX_IN_FLIGHT, ENV_REQUESTS_PER_TASK, ENV_ROWS_PER_TASK, ENV_TASK_CPUS,
                                          ENV_TASK_GPUS, NODE_HINT, ensure_ray, env_number)
from specdsl.executors.ray.limits import SharedLimits
from specdsl.executors.ray.tasks import generate_chunk, map_chunk
from specdsl.executors.ray.transport import backend_payload, describe_ray_error, raise_again


class RayExecutor:
    """``executor: ray``. See the module docstring."""

    name = "ray"

    def __init__(self, *, rows_per_task: int | None = None, requests_per_task: int | None = None,
                 task_cpus: float | None = None, task_gpus: float | None = None,
                 max_in_flight: int | None = None, num_cpus: int | None = None):
        self.rows_per_task = rows_per_task
        self.requests_per_task = requests_per_task
        self.task_cpus = task_cpus
        self.task_gpus = task_gpus
        self.max_in_flight = max_in_flight
        self.num_cpus = num_cpus
        self._remotes: dict[tuple, Any] = {}

    # -- settings -------------------------------------------------------------------------------------

    def _setting(self, attr: str, env: str, kind: type) -> Any:
        value = getattr(self, attr)
        return value if value is not None else env_number(env, kind)

    def _cpus_per_task(self) -> float:
        cpus = self._setting("task_cpus", ENV_TASK_CPUS, float)
        return 1.0 if cpus is None else cpus

    def _gpus_per_task(self) -> float:
        return self._setting("task_gpus", ENV_TASK_GPUS, float) or 0.0

    def slots(self) -> int:
        """Tasks the cluster can run at once (its CPUs / task_cpus, at least 1)."""
        ray = self.ray()
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        per = self._cpus_per_task()
        return max(1, int(cpus // per) if per > 0 else int(cpus))

    def _window(self, slots: int) -> int:
        return self._setting("max_in_flight", ENV_MAX_IN_FLIGHT, int) or 2 * slots

    def ray(self) -> Any:
        return ensure_ray(self.num_cpus)

    def _remote(self, fn: Callable, **options: Any) -> Any:
        key = (fn.__name__, tuple(sorted(options.items())))
        if key not in self._remotes:
            self._remotes[key] = self.ray().remote(**options)(fn)
        return self._remotes[key]

    # -- rows -----------------------------------------------------------------------------------------

    def rows_chunk_size(self, n: int, slots: int) -> int:
        explicit = self._setting("rows_per_task", ENV_ROWS_PER_TASK, int)
        if explicit:
            return explicit
        return min(max(math.ceil(n / (2 * slots)), 256), 20000)

    def map_rows(self, fn: Callable[[list[dict]], list[dict]], rows: list[dict]) -> list[dict]:
        """``fn`` over consecutive chunks of ``rows`` as Ray tasks, concatenated in input order."""
        if not rows:
            return fn(rows)
        ray = self.ray()
        slots = self.slots()
        size = self.rows_chunk_size(len(rows), slots)
        chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
        remote = self._remote(map_chunk, num_cpus=self._cpus_per_task(), num_gpus=self._gpus_per_task())
        fn_ref = ray.put(fn)
        window = self._window(slots)
        results: list[list[dict] | None] = [None] * len(chunks)
        todo = deque(enumerate(chunks))
        active: dict[Any, int] = {}
        done = False
        try:
            while todo or active:
                while todo and len(active) < window:
                    index, chunk = todo.popleft()
                    active[remote.options(name=f"specdsl-rows-{index}").remote(fn_ref, chunk)] = index
                ready, _ = ray.wait(list(active), num_returns=1)
                for ref in ready:
                    index = active.pop(ref)
                    try:
                        status, value = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a Ray-level failure (worker died, lost object)
                        first = index * size
                        raise RunError(f"the Ray task for rows {first}..{first + len(chunks[index]) - 1} failed: "
                                       f"{describe_ray_error(exc)}", hint=NODE_HINT) from None
                    if status == "error":
                        raise_again(value)
                    results[index] = value
            done = True
        finally:
            if not done:
                for ref in active:
                    _cancel(ray, ref, force=False)
        return [row for part in results for row in (part or [])]

    def run_streaming(self, fn: Callable[[list[dict]], Any], staging: Path, batch_rows: int, *,
                      rows: list[dict] | None = None, table: Path | None = None,
                      json_columns: Sequence[str] = ()) -> tuple[int, list[str], list[dict[str, Any]]]:
        """A row-parallel node, streamed through Ray Data: ``fn`` over the input (``rows`` in memory, or
        the stored Parquet ``table`` with its JSON-text columns) one batch of ``batch_rows`` rows at a
        time, in Ray workers; the output left in ``staging/data.parquet``. Returns (rows, JSON-text
        columns, each batch's meta: what ``fn`` returned beside its rows, such as the op's batch summary).
        See :mod:`specdsl.executors.ray.streaming`."""
        from specdsl.executors.ray.streaming import stream_node

        return stream_node(self, fn, staging, batch_rows, rows=rows, table=table, json_columns=json_columns)

    # -- generation -----------------------------------------------------------------------------------

    def requests_chunk_size(self, n: int, slots: int, options: Mapping[str, Any]) -> int:
        explicit = self._setting("requests_per_task", ENV_REQUESTS_PER_TASK, int)
        if explicit:
            return explicit
        batch = options.get("batch_size")
        floor = max(16, batch if isinstance(batch, int) and batch > 0 else 0)
        return max(1, min(max(math.ceil(n / (4 * slots)), floor), max(256, floor)))

    def wrap_backend(self, backend: Any) -> Any:
        if isinstance(backend, RayBackend):
            return backend
        return RayBackend(backend, self)


class RayBackend:
    """A generation backend whose ``generate`` answers chunks of requests in Ray tasks.

    Everything but ``generate`` is the wrapped backend's (identity, price, schema), so request keys,
    fingerprints and cost estimates do not depend on the executor.
    """

    def __init__(self, backend: Any, executor: RayExecutor):
        self.backend = backend
        self.executor = executor
        self.name = backend.name
        self.version = backend.version
        self.options_schema = backend.options_schema

    def identity(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        return self.backend.identity(options)

    def price(self, options: Mapping[str, Any], input_tokens: int, output_tokens: int) -> float | None:
        return self.backend.price(options, input_tokens, output_tokens)

    def __getattr__(self, item: str) -> Any:  # anything else a caller may look up on the real backend
        if item == "backend":
            raise AttributeError(item)
        return getattr(self.backend, item)

    def generate(self, options: Mapping[str, Any], requests: Sequence[GenRequest],
                 on_result: Callable[[GenResult], None]) -> None:
        requests = list(requests)
        if not requests:
            return
        ex = self.executor
        ray = ex.ray()
        slots = ex.slots()
        size = ex.requests_chunk_size(len(requests), slots, options)
        chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
        payload = backend_payload(ray, self.backend)
        options_ref = ray.put(dict(options))
        remote = ex._remote(generate_chunk, num_cpus=ex._cpus_per_task(), num_gpus=ex._gpus_per_task(),
                            max_retries=0)
        # One chunk is one task: its own limits are already the whole step's.
        limits = self._start_shared_limits(ray, payload, options_ref, options) if len(chunks) > 1 else None
        window = ex._window(slots)
        todo = deque(enumerate(chunks))
        active: dict[int, _Flight] = {}   # id(ObjectRefGenerator) -> its chunk
        done = False
        try:
            while todo or active:
                while todo and len(active) < window:
                    index, chunk = todo.popleft()
                    gen = remote.options(name=f"specdsl-generate-{self.name}-{index}").remote(
                        payload, options_ref, chunk, None if limits is None else (limits, index))
                    active[id(gen)] = _Flight(gen, index, chunk)
                ready, _ = ray.wait([f.gen for f in active.values()], num_returns=1)
                for gen in ready:
                    flight = active[id(gen)]
                    try:
                        ref = next(gen)
                    except StopIteration:
                        del active[id(gen)]
                        continue
                    try:
                        kind, value = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the task died: its unanswered requests fail
                        del active[id(gen)]
                        if limits is not None:  # what it held would otherwise be held for good
                            limits.forget.remote(flight.index)
                        reason = f"the Ray task answering it died: {describe_ray_error(exc)}"
                        for req in flight.unanswered():
                            flight.answered.add(req.key)
                            on_result(GenResult(key=req.key, error=reason))
                        continue
                    if kind == "results":
                        for res in value:
                            flight.answered.add(res.key)
                            on_result(res)
                    else:  # the backend raised: what it answered before is journaled; stop like local does
                        del active[id(gen)]
                        raise_again(value)
            done = True
        finally:
            if not done:  # an exception (ours, on_result's, Ctrl-C): stop paying for requests nobody records
                for flight in active.values():
                    _cancel(ray, flight.gen, force=True)
            if limits is not None:
                _kill(ray, limits)

    def _start_shared_limits(self, ray: Any, payload: Any, options_ref: Any, options: Mapping[str, Any]) -> Any:
        """The actor holding the limits these options set, shared by this call's tasks; None when the
        backend cannot share limits or the options set none (then nothing is started or paid for)."""
        make = getattr(self.backend, "make_limiter", None)
        if not callable(make) or not callable(getattr(self.backend, "with_limiter", None)):
            return None
        if make(options) is None:
            return None
        actor = self.executor._remote(SharedLimits, num_cpus=0, max_restarts=0)
        # num_cpus=0: it must get a place even when the tasks fill every CPU. The name shows in
        # `ray list actors`; the driver owns it, so it goes when the driver does.
        return actor.options(name=f"specdsl-limits-{self.name}-{uuid.uuid4().hex[:8]}").remote(payload, options_ref)


@dataclass
class _Flight:
    gen: Any
    index: int
    chunk: list[GenRequest]
    answered: set[str] = field(default_factory=set)

    def unanswered(self) -> list[GenRequest]:
        seen: set[str] = set()
        out = []
        for req in self.chunk:
            if req.key not in self.answered and req.key not in seen:
                seen.add(req.key)
                out.append(req)
        return out


def _cancel(ray: Any, ref: Any, *, force: bool) -> None:
    try:
        ray.cancel(ref, force=force)
    except Exception:  # noqa: BLE001 - already finished or gone
        pass


def _kill(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - already gone
        pass
