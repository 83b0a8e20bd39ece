"""The request loop shared by both transports: a fixed pool of workers, retries with exponential backoff
and jitter, ``Retry-After`` honoured for everyone on the key, and failures classified (retry, give up,
or stop the run when the key itself is refused).

A circuit breaker stops the batch when the server cannot be reached at all: after
``BREAKER_THRESHOLD`` consecutive attempts that could not connect (connection refused, no route, unknown
host) with no answer in between, every request still waiting fails at once with one message, instead of
each retrying with backoff on its own (minutes for 64 rows, hours for 10,000).

A transport supplies one coroutine, ``send(request, params) -> (text, input_tokens, output_tokens)``,
that raises :class:`Failure` for a failed attempt. asyncio is imported where the loop runs.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Awaitable, Callable, Mapping, Sequence

from specdsl.backends.litellm.limiter import RequestLimiter, estimate_tokens
from specdsl.backends.litellm.options import Settings
from specdsl.contract.hookspecs import GenRequest, GenResult
from specdsl.secrets import excerpt, redact_values

# Retry policy constants (the knobs users need are options; these are the safety rails).
RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
AUTH_STATUS = frozenset({401, 403})
MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 600.0
# Consecutive attempts that could not connect, none answered in between, before the batch stops: a
# restarting server answers again within a few of them; a server that is down never does.
BREAKER_THRESHOLD = 8

_log = logging.getLogger(__name__)


class Failure(Exception):
    """One failed attempt, classified: may it be retried, after how long, does it doom the run?"""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 retry_after: float | None = None, fatal: bool = False, unreachable: bool = False):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.fatal = fatal  # every other request would fail the same way (bad key): stop sending
        self.unreachable = unreachable  # no connection was made at all (refused, no route, unknown host)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``Retry-After`` (seconds or HTTP date) or ``retry-after-ms``; None if absent."""
    if not headers:
        return None
    try:
        ms = headers.get("retry-after-ms") or headers.get("Retry-After-Ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after") or headers.get("Retry-After")
    except Exception:
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except Exception:
        return None


Send = Callable[[GenRequest, Mapping[str, Any]], Awaitable[tuple[str, int, int]]]


class Engine:
    """Answers a batch of requests through ``send``, handing each result to ``on_result`` as it completes."""

    def __init__(self, s: Settings, send: Send, on_result: Callable[[GenResult], None],
                 price: Callable[[int, int], float | None], describe: str, limiter: Any = None,
                 backstop: bool = True):
        self.s = s
        self.send = send
        # A timeout of our own around each attempt, for transports whose own timeout may not cover it
        # all; the direct transport's aiohttp total timeout does (DNS, connect, body), so it saves the
        # timer (~6 us a request).
        self.backstop = backstop
        self.on_result = on_result
        self.price = price
        self.describe = describe  # "model at api_base" for messages
        if limiter is None and (s.rpm or s.tpm):
            # In one process the worker pool already bounds concurrency: only the rates need a limiter.
            limiter = RequestLimiter(None, s.rpm, s.tpm)
        self.limiter = limiter       # None: no limit to wait for, nothing to pay per request
        self.pause_until = 0.0       # set by a 429 with Retry-After: the whole key is throttled
        self.fatal: str | None = None
        self.unreachable_run = 0     # consecutive attempts that could not connect (the circuit breaker)
        self._stop: Any = None       # an asyncio.Event set when the batch must stop: wakes backoff sleeps
        self.drain_error: BaseException | None = None  # on_result asked to stop after in-flight requests

    def stop_all(self, message: str) -> None:
        """Fail every request not yet answered with ``message`` (once), waking those that back off."""
        if self.fatal is None:
            self.fatal = message
        if self._stop is not None:
            self._stop.set()

    async def _sleep(self, seconds: float) -> None:
        import asyncio

        if self._stop is None:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def run(self, requests: Sequence[GenRequest]) -> None:
        import asyncio

        self._stop = asyncio.Event()
        it = iter(requests)  # workers share one iterator; the event loop makes next() atomic

        stopped = False

        async def worker() -> None:
            nonlocal stopped
            for req in it:
                if self.drain_error is not None:
                    return  # the caller asked to stop sending: nothing new goes out
                res = await self._one(req)
                if stopped:
                    return  # on_result has raised: the caller wants no more results
                try:
                    self.on_result(res)
                except BaseException as exc:
                    if getattr(exc, "drain", False):
                        # "Stop, but keep what is in flight" (--fail-fast): those answers are paid for;
                        # they are still delivered, then this exception is raised.
                        if self.drain_error is None:
                            self.drain_error = exc
                            if self._stop is not None:
                                self._stop.set()  # wake requests backing off: they are not retried
                        continue
                    stopped = True  # other workers may finish a request before this task is reaped
                    raise

        # A fixed pool of workers rather than a task per request: memory stays flat for 100k requests,
        # and `concurrency` bounds requests in flight (or backing off) exactly.
        n = min(self.s.concurrency, len(requests))
        tasks = [asyncio.create_task(worker()) for _ in range(n)]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()
        if self.drain_error is not None:
            raise self.drain_error

    def _backoff(self, attempt: int) -> float:
        base = min(MAX_BACKOFF_S, self.s.retry_backoff_s * (2 ** attempt))
        return base / 2 + random.uniform(0, base / 2)  # "equal jitter": spread retries, keep a floor

    async def _one(self, req: GenRequest) -> GenResult:
        import asyncio

        s = self.s
        limiter = self.limiter
        params = {**s.defaults, **req.params}
        est = estimate_tokens(req.messages, params.get("max_tokens")) if limiter is not None else 0
        t0 = time.monotonic()
        attempt = 0
        while True:
            if self.fatal is not None:
                return GenResult(key=req.key, error=self.fatal, latency_s=time.monotonic() - t0)
            wait = self.pause_until - time.monotonic()
            if wait > 0:
                await self._sleep(wait)
                continue  # the pause may have ended in a stop
            if limiter is not None:
                await limiter.acquire(est)
            used = est  # what the attempt cost, until the response says better
            failure: Failure | None = None
            try:
                try:
                    # The transport has its own timeout; this one is the backstop for anything that
                    # ignores it (a stuck DNS lookup, a provider client that retries internally).
                    if self.backstop:
                        async with asyncio.timeout(s.timeout_s + 5.0):
                            text, in_tok, out_tok = await self.send(req, params)
                    else:
                        text, in_tok, out_tok = await self.send(req, params)
                except TimeoutError:
                    raise Failure(f"timed out after {s.timeout_s:g} s", retryable=True) from None
                except Failure:
                    raise
                except Exception as exc:  # unforeseen (a response litellm cannot parse): fail this one
                    raise Failure(f"{type(exc).__name__}: {excerpt(str(exc), s.secrets)}",
                                  retryable=False) from None
                used = in_tok + out_tok
            except Failure as f:
                failure = f
                if f.status is not None and 400 <= f.status < 500:
                    used = 0  # a rejected request consumed no tokens
            finally:
                # Before any backoff sleep: a slot must not sit idle while this request waits to retry.
                if limiter is not None:
                    limiter.release(est, used)
            if failure is not None:
                f = failure
                if f.fatal:
                    self.stop_all(f.message)
                if f.unreachable:
                    self.unreachable_run += 1
                    if self.unreachable_run >= BREAKER_THRESHOLD:
                        self.stop_all(f"cannot reach {self.describe}: {f.message} ({self.unreachable_run} "
                                      "attempts in a row could not connect; is the server running?)")
                else:
                    self.unreachable_run = 0  # something answered, even if with an error
                if self.fatal is not None:
                    return GenResult(key=req.key, error=self.fatal, latency_s=time.monotonic() - t0)
                if not f.retryable or attempt >= s.max_retries or self.drain_error is not None:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    return GenResult(key=req.key, error=f"{f.message}{tries}",
                                     latency_s=time.monotonic() - t0)
                if f.retry_after is not None:
                    delay = min(f.retry_after, MAX_RETRY_AFTER_S)
                    # Everyone on this key is throttled, not just this request: pause all new attempts
                    # (in every process, when the limiter is shared).
                    self.pause_until = max(self.pause_until, time.monotonic() + delay)
                    if limiter is not None:
                        limiter.pause(delay)
                    delay += random.uniform(0, min(1.0, 0.1 * delay))  # don't return in lockstep
                else:
                    delay = self._backoff(attempt)
                _log.debug("retrying %s in %.2fs: %s", req.row_id or req.key[:12], delay, f.message)
                attempt += 1
                await self._sleep(delay)
                if self.drain_error is not None:
                    return GenResult(key=req.key, error=f"{f.message} (not retried: the run stopped at the "
                                     "first failure)", latency_s=time.monotonic() - t0)
                continue
            self.unreachable_run = 0
            cost = self.price(in_tok, out_tok)
            return GenResult(key=req.key, text=text, input_tokens=in_tok, output_tokens=out_tok,
                             cost=cost or 0.0, latency_s=time.monotonic() - t0)

    def auth_message(self, status: int | None, detail: str) -> str:
        where = (f"the key from environment variable {self.s.api_key_env}" if self.s.api_key_env
                 else "the configured api_key (or the provider's default environment variable)")
        code = f"HTTP {status}" if status else "authentication error"
        detail = redact_values(detail, self.s.secrets)
        return (f"authentication failed ({code}) for {self.describe}: the provider rejected {where}"
                + (f": {detail}" if detail else ""))



def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

