"""Limits shared by the tasks of one generate call: the async actor hosting the backend's limiter
(:class:`SharedLimits`) and the limiter each task's backend sees instead of its own
(:class:`SharedLimiterClient`). See :mod:`specdsl.executors.ray` for when they are used."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from specdsl.errors import RunError
from specdsl.executors.ray.connect import NODE_HINT
from specdsl.executors.ray.transport import BackendByName, capture_error, describe_ray_error, raise_again


class SharedLimits:
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
            real = backend.resolve() if isinstance(backend, BackendByName) else backend
            self.limiter = real.make_limiter(options)
            if self.limiter is None:  # the driver saw limits in the same options: not the same backend
                raise RunError(f"backend '{real.name}' built no limiter on this Ray worker for options that set "
                               "limits", hint=NODE_HINT)
        except BaseException as exc:  # noqa: BLE001 - travels back and is raised again in the tasks
            self.failure = capture_error(exc)

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


class SharedLimiterClient:
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
                                        f"{describe_ray_error(exc)}", hint=NODE_HINT))
                    return
                finally:
                    self._calling = False
                if kind == "error":  # the actor could not build the limiter: say why, as itself
                    try:
                        raise_again(granted)
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
