"""The Ray executor: row-parallel ops and generation requests fan out as Ray tasks.

``specdsl run spec.yaml --executor ray`` (or ``run(plan, executor="ray")``) runs the same plan as the
local executor; only *where* the work happens changes:

* **Row-parallel ops** (``map``, ``filter``, ``format``, ``erase_prompt``, ``pam``: ops with
  ``row_parallel = True``) are cut into consecutive chunks of rows; each chunk runs as one Ray task and
  the results are concatenated in input order, so the table is the one the local executor writes.
* **Generation** goes through :meth:`RayExecutor.wrap_backend`: the requests that the request journal
  did not already answer are cut into chunks, each chunk is answered by the real backend's
  ``generate`` inside one Ray task, and every result streams back to this process (a Ray streaming
  generator) where ``on_result`` persists it in the journal as it arrives. A killed run loses only the
  answers that were in flight, never a journaled one; a request in the journal is never sent to Ray.
* **Limits hold for the whole generate call, across the cluster**, for a backend that can share them
  (the optional ``make_limiter`` / ``with_limiter`` methods, ``LimitedBackend`` in
  :mod:`specdsl.contract.hookspecs`; litellm has them). When the model's options set a limit (litellm:
  ``concurrency``, ``rpm``, ``tpm``), the driver starts one async actor (:class:`_SharedLimits`) that
  hosts the limiter the backend builds; every task's backend is handed a :class:`_SharedLimiterClient`
  instead of its own limits, and each attempt is admitted by the actor (the requests a task has
  waiting go in one call; a finished request's slot and token correction ride on the next call). The
  actor lives as long as the ``generate`` call; a task that dies has its slots given back. Options that
  set no limit, or requests that fit in one task, start no actor and cost nothing. Other bounds (transformers' ``batch_size``, litellm's
  default concurrency of 16 when left out) hold *per task*: requests in flight are up to
  ``tasks running at once x per-task concurrency``. Tasks running at once are bounded by the cluster's
  CPUs divided by ``task_cpus`` and by ``max_in_flight``.

Connecting: ``RAY_ADDRESS`` set (``auto``, ``host:6379`` or ``ray://host:10001``) connects to that
cluster; unset, a private local Ray instance starts with ``SPECDSL_RAY_NUM_CPUS`` CPUs (default: the
machine's, at most 8). When Ray is already initialised in this process (a notebook, a test, a driver
that called ``ray.init(runtime_env=...)``) that connection is used as is.

Tuning (attributes of the executor, or environment variables read when work starts):

=======================  ================================  =========================================
attribute                environment variable              default
=======================  ================================  =========================================
``rows_per_task``        ``SPECDSL_RAY_ROWS_PER_TASK``     rows / (2 x slots), within [256, 20000]
``requests_per_task``    ``SPECDSL_RAY_REQUESTS_PER_TASK`` requests / (4 x slots), within
                                                           [max(16, batch_size), 256]
``task_cpus``            ``SPECDSL_RAY_TASK_CPUS``         1 (CPUs Ray reserves per task)
``task_gpus``            ``SPECDSL_RAY_TASK_GPUS``         0 (set 1 for a local GPU model per task)
``max_in_flight``        ``SPECDSL_RAY_MAX_IN_FLIGHT``     2 x slots (tasks submitted at once)
``num_cpus``             ``SPECDSL_RAY_NUM_CPUS``          min(cpu_count, 8) (local instance only)
=======================  ================================  =========================================

``slots`` is the cluster's CPU count divided by ``task_cpus``.

Failures: an exception raised by an op or a backend inside a task is raised again here as itself (a
:class:`~specdsl.errors.RunError` keeps its node and hint), never as a Ray traceback. A task that dies
(worker killed, node lost, out of memory) makes a :class:`RunError` for a row chunk; for a generation
chunk its unanswered requests come back as failed ``GenResult``s, so the node is incomplete and the
next run retries exactly those. Generation tasks are not retried by Ray (``max_retries=0``): re-issuing
requests is the journal's job, and a paid request is never sent twice behind its back.

Everything a task needs travels by pickle: the op (a module-level object) with its parameters, the
backend object (or, when it cannot be pickled, its name, looked up again in the worker's plugin
registry) and the model options *with secrets resolved*: API keys reach the workers, as they must to
call a provider. Every Ray node needs specdsl and the plugins the spec uses installed.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import pickle
import queue
import threading
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from specdsl.errors import RunError
from specdsl.contract.hookspecs import GenRequest, GenResult

ENV_ROWS_PER_TASK = "SPECDSL_RAY_ROWS_PER_TASK"
ENV_REQUESTS_PER_TASK = "SPECDSL_RAY_REQUESTS_PER_TASK"
ENV_TASK_CPUS = "SPECDSL_RAY_TASK_CPUS"
ENV_TASK_GPUS = "SPECDSL_RAY_TASK_GPUS"
ENV_MAX_IN_FLIGHT = "SPECDSL_RAY_MAX_IN_FLIGHT"
ENV_NUM_CPUS = "SPECDSL_RAY_NUM_CPUS"

INSTALL_HINT = "pip install 'specdsl[ray]'"
NODE_HINT = "every Ray node needs the same specdsl and the plugins the spec uses installed"

_INIT_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RunError(f"the ray executor needs Ray, which is not importable here ({exc})",
                       hint=INSTALL_HINT) from None
    return ray


def ensure_ray(num_cpus: int | None = None) -> Any:
    """Connect to Ray once per process and return the ``ray`` module.

    Reuses an existing connection; else connects to ``RAY_ADDRESS`` when set; else starts a local
    instance with ``num_cpus`` CPUs (default ``SPECDSL_RAY_NUM_CPUS``, else min(cpu_count, 8)).
    """
    ray = _import_ray()
    with _INIT_LOCK:
        if ray.is_initialized():
            return ray
        address = os.environ.get("RAY_ADDRESS", "").strip() or None
        quiet = {"ignore_reinit_error": True, "log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                cpus = num_cpus or _env_number(ENV_NUM_CPUS, int) or min(os.cpu_count() or 1, 8)
                # "local": never attach silently to some other `ray start` cluster on this machine
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
        except RunError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray raises many types (ConnectionError, ValueError, ...)
            where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray instance"
            raise RunError(f"cannot start or reach {where}: {type(exc).__name__}: {_first_line(exc)}",
                           hint="check `ray status`; unset RAY_ADDRESS to run on a private local instance"
                           if address else "see /tmp/ray/session_latest/logs") from None
    return ray


def _env_number(name: str, kind: type) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise RunError(f"{name}={raw!r} is not a {'whole ' if kind is int else ''}number") from None
    if value < 0 or (kind is int and value == 0):
        raise RunError(f"{name}={raw!r} must be positive")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# --------------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------------


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
        return value if value is not None else _env_number(env, kind)

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
        remote = self._remote(_map_chunk, num_cpus=self._cpus_per_task(), num_gpus=self._gpus_per_task())
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
                                       f"{_describe_ray_error(exc)}", hint=NODE_HINT) from None
                    if status == "error":
                        _reraise(value)
                    results[index] = value
            done = True
        finally:
            if not done:
                for ref in active:
                    _cancel(ray, ref, force=False)
        return [row for part in results for row in (part or [])]

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
        payload = _backend_payload(ray, self.backend)
        options_ref = ray.put(dict(options))
        remote = ex._remote(_generate_chunk, num_cpus=ex._cpus_per_task(), num_gpus=ex._gpus_per_task(),
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
                        reason = f"the Ray task answering it died: {_describe_ray_error(exc)}"
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
                        _reraise(value)
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
        actor = self.executor._remote(_SharedLimits, num_cpus=0, max_restarts=0)
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


# --------------------------------------------------------------------------------------------------
# Inside the tasks (module-level so workers import them by reference)
# --------------------------------------------------------------------------------------------------


def _map_chunk(fn: Callable[[list[dict]], list[dict]], rows: list[dict]) -> tuple[str, Any]:
    try:
        return "ok", fn(rows)
    except BaseException as exc:  # noqa: BLE001 - travels back and is raised again in the driver
        return "error", _capture(exc)


@dataclass(frozen=True)
class _ByName:
    """A backend that could not be pickled: looked up again in the worker's plugin registry."""

    name: str

    def resolve(self) -> Any:
        # This runs in a Ray worker, where no caller is left to hand the backend over: the only place it
        # can come from is the plugins installed on that node. Found by module name at run time (as entry
        # points are) because specdsl.plugins is the layer that registers this executor, not one below it.
        registry = importlib.import_module("specdsl.plugins").default_registry()
        backend = registry.backends.get(self.name)
        if backend is None:
            raise RunError(f"generation backend '{self.name}' is not installed on this Ray worker", hint=NODE_HINT)
        return backend


def _backend_payload(ray: Any, backend: Any) -> Any:
    """The backend as an object-store ref, or its name when it cannot be pickled."""
    try:
        return ray.put(backend)
    except Exception:  # noqa: BLE001 - e.g. it holds a lock or a client
        return _ByName(backend.name)


_DONE = object()
_MAX_BATCH = 256


def _generate_chunk(backend: Any, options: Mapping[str, Any], requests: list[GenRequest],
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
            real = backend.resolve() if isinstance(backend, _ByName) else backend
            if limits is not None:
                client = _SharedLimiterClient(*limits)
                real = real.with_limiter(client)
            real.generate(options, requests, answers.put)
        except BaseException as exc:  # noqa: BLE001
            failure.append(_capture(exc))
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


# --------------------------------------------------------------------------------------------------
# Limits shared by the tasks of one generate call
# --------------------------------------------------------------------------------------------------


class _SharedLimits:
    """The limiter of one generate call, in an async Ray actor that every task of the call asks.

    It hosts the limiter the backend builds (``make_limiter(options)``, so the semantics are the
    backend's own: for litellm a FIFO concurrency semaphore, rpm and tpm token buckets, Retry-After
    pauses) and keeps, per task ("holder"), the grants it is waiting for and the slots it holds, so a
    task that dies can have them back (:meth:`forget`).
    """

    def __init__(self, backend: Any, options: Mapping[str, Any]):
        # A failure here is kept and reported by acquire(), as itself: an actor whose constructor raises
        # only tells its callers "the actor died", without the message or the hint.
        self.failure: dict[str, Any] | None = None
        self.limiter: Any = None
        self.holders: dict[int, _Holder] = {}
        try:
            real = backend.resolve() if isinstance(backend, _ByName) else backend
            self.limiter = real.make_limiter(options)
            if self.limiter is None:  # the driver saw limits in the same options: not the same backend
                raise RunError(f"backend '{real.name}' built no limiter on this Ray worker for options that set "
                               "limits", hint=NODE_HINT)
        except BaseException as exc:  # noqa: BLE001 - travels back and is raised again in the tasks
            self.failure = _capture(exc)

    async def acquire(self, holder: int, releases: list[tuple[int, int]],
                      wanted: list[tuple[int, int]]) -> tuple[str, Any]:
        """Take back ``releases`` ((reserved, used) per finished request), queue ``wanted`` ((grant id,
        estimated tokens) per request), then wait until at least one of the holder's queued grants is
        admitted; return ("granted", the ids of all admitted by then), or ("error", info) when there
        is no limiter."""
        import asyncio

        if self.failure is not None:
            return "error", self.failure
        h = self.holders.setdefault(holder, _Holder())
        if h.closed:
            return "granted", []
        self._give_back(h, releases)
        for gid, tokens in wanted:
            h.pending[gid] = asyncio.ensure_future(self.limiter.acquire(tokens))
        if not h.pending:
            return "granted", []
        await asyncio.wait(list(h.pending.values()), return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0)  # grants admitted in the same instant go in this answer too
        if h.closed:  # forgotten while waiting: forget() has given back what was admitted
            return "granted", []
        granted = []
        for gid, grant in list(h.pending.items()):
            if grant.done():
                del h.pending[gid]
                if grant.exception() is not None:
                    raise grant.exception()
                granted.append(gid)
        h.held += len(granted)
        return "granted", granted

    async def release(self, holder: int, releases: list[tuple[int, int]]) -> None:
        h = self.holders.get(holder)
        if h is not None and not h.closed:
            self._give_back(h, releases)

    async def pause(self, seconds: float) -> None:
        if self.limiter is not None:
            self.limiter.pause(seconds)

    async def forget(self, holder: int) -> None:
        """The task is over (or dead): give back every slot it held or was being admitted to."""
        h = self.holders.setdefault(holder, _Holder())
        if h.closed or self.limiter is None:
            return
        h.closed = True
        for grant in h.pending.values():
            if grant.done() and not grant.cancelled() and grant.exception() is None:
                h.held += 1
            else:
                grant.cancel()
        h.pending.clear()
        for _ in range(h.held):
            self.limiter.release(0, 0)  # the tokens stay spent: the request may have reached the provider
        h.held = 0

    def _give_back(self, h: "_Holder", releases: list[tuple[int, int]]) -> None:
        for reserved, used in releases:
            self.limiter.release(reserved, used)
        h.held -= len(releases)


@dataclass
class _Holder:
    pending: dict[int, Any] = field(default_factory=dict)  # grant id -> the asyncio task admitting it
    held: int = 0       # admitted and not yet released
    closed: bool = False


class _SharedLimiterClient:
    """The limiter a backend sees inside a generation task: each attempt is admitted by the actor.

    ``acquire`` queues the request locally; one pump coroutine sends everything queued in a single
    actor call and wakes the requests the actor admits. ``release`` is recorded and given back on the
    next actor call, or on its own one loop turn later when no call is about to go (or one is already
    waiting, maybe for that very slot). Lives on the backend's event loop; ``close()`` (from any thread,
    after ``generate``) returns whatever is still held.
    """

    def __init__(self, actor: Any, holder: int):
        self.actor = actor
        self.holder = holder
        self._loop: Any = None
        self._wake: Any = None
        self._pump_task: Any = None
        self._next_id = 0
        self._waiting: dict[int, tuple[int, Any]] = {}   # grant id -> (tokens, future of its acquire)
        self._unsent: list[tuple[int, int]] = []         # (grant id, tokens) not yet sent to the actor
        self._outstanding = 0                            # sent and not yet admitted
        self._releases: list[tuple[int, int]] = []
        self._calling = False
        self._flush_scheduled = False
        self._broken: BaseException | None = None

    async def acquire(self, tokens: int) -> None:
        import asyncio

        if self._broken is not None:
            raise self._broken
        if self._pump_task is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._pump_task = self._loop.create_task(self._pump())
        gid = self._next_id
        self._next_id += 1
        fut = self._loop.create_future()
        self._waiting[gid] = (tokens, fut)
        self._unsent.append((gid, tokens))
        self._wake.set()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(tokens, 0)  # admitted just as we were cancelled: give it straight back
            raise

    def release(self, reserved: int, used: int) -> None:
        self._releases.append((reserved, used))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def pause(self, seconds: float) -> None:
        self.actor.pause.remote(seconds)

    def close(self) -> None:
        if self._releases:
            self.actor.release.remote(self.holder, self._releases)
            self._releases = []
        self.actor.forget.remote(self.holder)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._releases:
            return
        if self._unsent and not self._calling:
            self._wake.set()  # an acquire call is about to go: the releases ride on it
            return
        releases, self._releases = self._releases, []
        self.actor.release.remote(self.holder, releases)

    async def _pump(self) -> None:
        import asyncio

        try:
            await self._admit()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - a failure here must not leave requests waiting forever
            self._fail(RunError(f"the shared rate limiter's client failed: {type(exc).__name__}: {exc}",
                                hint=NODE_HINT))

    async def _admit(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._unsent or self._outstanding:
                wanted, self._unsent = self._unsent, []
                releases, self._releases = self._releases, []
                self._outstanding += len(wanted)
                self._calling = True
                try:
                    kind, granted = await self.actor.acquire.remote(self.holder, releases, wanted)
                except Exception as exc:  # noqa: BLE001 - the actor is gone or its limiter failed
                    self._fail(RunError(f"the shared rate limiter of this generate step failed: "
                                        f"{_describe_ray_error(exc)}", hint=NODE_HINT))
                    return
                finally:
                    self._calling = False
                if kind == "error":  # the actor could not build the limiter: say why, as itself
                    try:
                        _reraise(granted)
                    except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                        self._fail(exc)
                    return
                self._outstanding -= len(granted)
                for gid in granted:
                    tokens, fut = self._waiting.pop(gid)
                    if fut.done():  # its acquire was cancelled meanwhile
                        self.release(tokens, 0)
                    else:
                        fut.set_result(None)
            if self._releases and not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)

    def _fail(self, error: BaseException) -> None:
        self._broken = error
        for _tokens, fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(self._broken)
        self._waiting.clear()


# --------------------------------------------------------------------------------------------------
# Errors across the process boundary
# --------------------------------------------------------------------------------------------------


def _capture(exc: BaseException) -> dict[str, Any]:
    """What the driver needs to raise ``exc`` again as itself (or a RunError that says what it was)."""
    import socket

    info: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": _tail("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))),
        "where": f"Ray worker pid {os.getpid()} on {socket.gethostname()}",
    }
    if isinstance(exc, RunError):
        info["run_error"] = {"message": exc.message, "node": exc.node, "hint": exc.hint, "pos": exc.pos}
        return info
    try:
        blob = pickle.dumps(exc)
        back = pickle.loads(blob)
        if type(back) is type(exc) and str(back) == str(exc):
            info["pickled"] = blob
    except Exception:  # noqa: BLE001 - not every exception survives pickling
        pass
    return info


def _tail(text: str, lines: int = 25) -> str:
    kept = text.rstrip().splitlines()
    return "\n".join((["  ..."] if len(kept) > lines else []) + kept[-lines:])


def _reraise(info: Mapping[str, Any]) -> None:
    if "run_error" in info:
        e = info["run_error"]
        raise RunError(e["message"], node=e["node"], hint=e["hint"], pos=e["pos"]) from None
    if "pickled" in info:
        exc = pickle.loads(info["pickled"])
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise RunError(f"a Ray task was interrupted ({info['type']})")
        exc.add_note(f"(raised in a Ray task, {info['where']}; its traceback:)\n{info['traceback'].rstrip()}")
        raise exc
    raise RunError(f"{info['type']}: {info['message']}",
                   hint=f"raised in a Ray task, {info['where']}; its traceback:\n{info['traceback'].rstrip()}")


def _describe_ray_error(exc: BaseException) -> str:
    """A one-line account of a Ray-level failure (no Ray traceback)."""
    try:
        from ray import exceptions as rex
    except ImportError:  # pragma: no cover
        return f"{type(exc).__name__}: {_first_line(exc)}"
    if isinstance(exc, rex.OutOfMemoryError):
        return "Ray killed the worker because the node ran out of memory"
    if isinstance(exc, rex.TaskCancelledError):
        return "the task was cancelled"
    if isinstance(exc, rex.WorkerCrashedError):
        return "the worker process exited unexpectedly (killed, crashed or out of memory)"
    if isinstance(exc, rex.NodeDiedError):
        return "the Ray node running it died"
    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        if cause is not None:
            return f"{type(cause).__name__}: {_first_line(cause)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"
