"""Admission control for one model's requests: concurrency, requests and tokens per minute, and the
pause a ``Retry-After`` imposes on everyone sharing a key.

:class:`RequestLimiter` is what an executor hosts and shares between processes (see ``LimitedBackend``
in :mod:`specdsl.contract.hookspecs`); in one process the engine builds one only when the model sets
``rpm`` or ``tpm``. asyncio is imported where a limiter is built, not here.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence


class TokenBucket:
    """Async token bucket: ``rate`` units per second, at most ``capacity`` saved up.

    A request bigger than the capacity waits for a full bucket and then drives the level negative,
    so the average rate holds even for prompts larger than one second's allowance. Waiters are served
    in order (the lock is FIFO), so a big request is not starved by small ones.
    """

    def __init__(self, rate: float, capacity: float):
        import asyncio

        self.rate = rate
        self.capacity = max(capacity, 1.0)
        self.level = self.capacity
        self.t = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    async def acquire(self, amount: float = 1.0) -> None:
        import asyncio

        async with self._lock:
            need = min(amount, self.capacity)
            while True:
                self._refill()
                if self.level >= need:
                    self.level -= amount
                    return
                await asyncio.sleep((need - self.level) / self.rate)

    def refund(self, amount: float) -> None:
        """Give back (or, negative, take) units once the real cost of a request is known."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class RequestLimiter:
    """Admission for one model's requests: ``concurrency`` in flight, ``rpm`` requests and ``tpm`` tokens
    a minute (token buckets holding one second's worth), and a pause after a ``Retry-After``.

    Each attempt calls ``await acquire(estimated_tokens)`` before it is sent and ``release(reserved,
    used)`` once it is over: ``used`` corrects the tpm reservation from the reported usage (0 for a
    rejected 4xx request, ``reserved`` when nothing better is known). Lives on one event loop. In one
    process the backend builds it without ``concurrency`` (its worker pool is the bound); an executor
    hosts one with every limit the model sets and shares it between processes.
    """

    def __init__(self, concurrency: int | None, rpm: float | None, tpm: float | None):
        import asyncio

        self.concurrency = concurrency
        self.rpm = rpm
        self.tpm = tpm
        self._slots = asyncio.Semaphore(concurrency) if concurrency else None
        self._rpm = TokenBucket(rpm / 60.0, rpm / 60.0) if rpm else None
        self._tpm = TokenBucket(tpm / 60.0, tpm / 60.0) if tpm else None
        self._pause_until = 0.0

    async def acquire(self, tokens: int) -> None:
        import asyncio

        while (wait := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        # The slot first: a request holding a rate token while it waits for a slot would let the
        # saved-up tokens go out in a burst when slots free up.
        if self._slots is not None:
            await self._slots.acquire()
        try:
            if self._rpm is not None:
                await self._rpm.acquire(1)
            if self._tpm is not None:
                await self._tpm.acquire(tokens)
        except BaseException:  # cancelled while waiting for a rate: the slot goes back
            if self._slots is not None:
                self._slots.release()
            raise

    def release(self, reserved: int, used: int) -> None:
        if self._slots is not None:
            self._slots.release()
        if self._tpm is not None and used != reserved:
            self._tpm.refund(reserved - used)

    def pause(self, seconds: float) -> None:
        self._pause_until = max(self._pause_until, time.monotonic() + seconds)


def estimate_tokens(messages: Sequence[Mapping[str, Any]], max_tokens: Any) -> int:
    """A cheap upper-ish estimate for the tpm limiter: ~4 characters per token plus the answer budget."""
    chars = sum(len(str(m.get("content", ""))) + 8 for m in messages)
    return int(math.ceil(chars / 4)) + (int(max_tokens) if isinstance(max_tokens, int) else 256)

