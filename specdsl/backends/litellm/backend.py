"""Generation through LLM provider APIs, with litellm doing provider translation and pricing.

``LiteLLMBackend`` answers a batch of chat requests with bounded concurrency, requests-per-minute and
tokens-per-minute limits, and its own retry loop (exponential backoff with jitter, ``Retry-After``
honoured). Each result is handed to ``on_result`` the moment it completes, so the caller can persist
it before the next one arrives.

Two transports
--------------
``litellm``  every request goes through ``litellm.acompletion``. Works for every provider litellm
             knows (Anthropic, Gemini, Bedrock, Azure, ...). Its per-call CPU cost is about 4-5 ms
             here (logging objects, cost calculation, the openai SDK's request/response models),
             which caps one process at roughly 200-250 requests/s on a free core.
``direct``   for providers that speak the OpenAI chat-completions wire format (``openai/``,
             ``hosted_vllm/``, ``custom_openai/``): litellm still resolves the provider, maps the
             sampling parameters (``get_optional_params``, cached per distinct parameter set) and prices
             tokens from its local cost map, but the HTTP call is one POST on a shared aiohttp session.
             About 0.3-0.4 ms of CPU per request (bare aiohttp: 0.25 ms).
``auto``     (default) ``direct`` where the provider speaks the OpenAI wire format, else ``litellm``.

Limits
------
``concurrency`` is the size of the worker pool, so in one process it bounds requests in flight with no
extra work; ``rpm`` and ``tpm`` go through a :class:`RequestLimiter`. An executor that spreads one model's
requests over several processes (Ray) shares the limits the model sets instead: :meth:`LiteLLMBackend.make_limiter`
builds the limiter it hosts, and :meth:`LiteLLMBackend.with_limiter` returns a backend whose every attempt
is admitted by that shared limiter (see ``LimitedBackend`` in :mod:`specdsl.contract.hookspecs`).

Importing this module is cheap: asyncio, litellm and aiohttp are imported inside the methods that run
(asyncio alone is ~20 ms of ``specdsl validate``, which never generates).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence

from specdsl.contract.hookspecs import GenRequest, GenResult

# Our own version: it feeds node fingerprints. litellm's version is deliberately NOT part of it, nor of
# identity(): the provider, not the client library, decides the answer, and upgrading litellm must not
# invalidate (and re-bill) every cached generation.
BACKEND_VERSION = "1"

ENV_REF_PATTERN = r"^\$\{env:[A-Za-z_][A-Za-z0-9_]*\}$"

# Providers whose chat endpoint is exactly OpenAI's ``POST {api_base}/chat/completions``.
OPENAI_WIRE_PROVIDERS = frozenset({"openai", "hosted_vllm", "custom_openai"})

# Retry policy constants (the knobs users need are options; these are the safety rails).
RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
AUTH_STATUS = frozenset({401, 403})
MAX_BACKOFF_S = 60.0
MAX_RETRY_AFTER_S = 600.0

DEFAULTS: dict[str, Any] = {
    "max_tokens": 1024,
    "timeout_s": 120.0,
    "max_retries": 6,
    "retry_backoff_s": 1.0,
    "concurrency": 16,
    "transport": "auto",
    "drop_params": False,
}

OPTIONS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "description": "Options of a model served through litellm (besides `backend` and `model`). "
                   "`model` is a litellm model name: `openai/gpt-4o-mini`, `anthropic/claude-...`, or "
                   "`openai/<name>` / `hosted_vllm/<name>` with `api_base` for an OpenAI-compatible server.",
    "properties": {
        "api_base": {
            "type": "string", "pattern": "^https?://", "minLength": 8,
            "description": "Base URL of the provider API, e.g. `http://10.0.0.5:8000/v1` for a vLLM "
                           "server. Default: the provider's public endpoint.",
        },
        "api_key": {
            "type": "string", "pattern": ENV_REF_PATTERN,
            "description": "The API key as `${env:NAME}`; never write a key inline. Default: the "
                           "provider's usual variable (e.g. OPENAI_API_KEY), read by litellm.",
        },
        "temperature": {
            "type": "number", "minimum": 0, "maximum": 2,
            "description": "Sampling temperature sent with every request unless the step sets its own. "
                           "Default: not sent (the provider's default).",
        },
        "top_p": {
            "type": "number", "exclusiveMinimum": 0, "maximum": 1,
            "description": "Nucleus sampling. Default: not sent (the provider's default).",
        },
        "max_tokens": {
            "type": "integer", "minimum": 1,
            "description": "Maximum tokens per answer unless the step sets its own. Default: 1024.",
        },
        "timeout_s": {
            "type": "number", "exclusiveMinimum": 0, "maximum": 3600,
            "description": "Per-attempt timeout in seconds; a timed-out attempt is retried. "
                           "Default: 120.",
        },
        "max_retries": {
            "type": "integer", "minimum": 0, "maximum": 50,
            "description": "Retries after the first attempt on 408/409/429/5xx, timeouts and "
                           "connection errors (never on other 4xx). Default: 6.",
        },
        "retry_backoff_s": {
            "type": "number", "minimum": 0, "maximum": 60,
            "description": "First retry delay in seconds; it doubles on each retry (with jitter, at "
                           "most 60 s). A server's `Retry-After` takes precedence. Default: 1.",
        },
        "concurrency": {
            "type": "integer", "minimum": 1, "maximum": 4096,
            "description": "Requests in flight at once. Default: 16.",
        },
        "rpm": {
            "type": "number", "exclusiveMinimum": 0,
            "description": "Requests per minute, paced smoothly (at most one second's worth in a burst). "
                           "Default: unlimited.",
        },
        "tpm": {
            "type": "number", "exclusiveMinimum": 0,
            "description": "Tokens per minute (prompt estimate + max_tokens reserved before each "
                           "request, corrected from the reported usage after). Default: unlimited.",
        },
        "extra_headers": {
            "type": "object", "additionalProperties": {"type": "string"},
            "description": "Extra HTTP headers sent with every request. Values must not be secrets.",
        },
        "drop_params": {
            "type": "boolean",
            "description": "Drop sampling parameters the model does not support instead of failing "
                           "(litellm's drop_params). Default: false.",
        },
        "transport": {
            "enum": ["auto", "direct", "litellm"],
            "description": "`direct`: one shared aiohttp session speaking the OpenAI wire format "
                           "(openai/, hosted_vllm/, custom_openai/ models); `litellm`: litellm.acompletion "
                           "for every request (any provider, ~4 ms more CPU per request); `auto` "
                           "(default): direct where possible. Does not change answers or fingerprints.",
        },
    },
    "additionalProperties": False,
}

_log = logging.getLogger(__name__)
_litellm_lock = threading.Lock()
_litellm_module = None


def _import_litellm():
    """Import litellm once, offline and quiet."""
    global _litellm_module
    _quiet_warnings()
    if _litellm_module is not None:
        return _litellm_module
    with _litellm_lock:
        if _litellm_module is None:
            # Without this litellm fetches a remote cost map at import and, offline, retries for seconds.
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            os.environ.setdefault("LITELLM_TELEMETRY", "False")
            import litellm

            litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on errors
            litellm.telemetry = False
            litellm.set_verbose = False
            # litellm logs every failed attempt; we retry and report failures ourselves, so its logs
            # would be noise (and could echo request details). LITELLM_LOG=... still turns them on.
            if not os.environ.get("LITELLM_LOG"):
                for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
                    logging.getLogger(name).setLevel(logging.CRITICAL)
            _litellm_module = litellm
    return _litellm_module


def _quiet_warnings() -> None:
    """pydantic warns about litellm's TypedDicts on first use: noise to our users, not actionable.

    Re-applied on every use (an identical filter replaces itself) because test runners and
    ``warnings.catch_warnings`` blocks restore the filter list behind our back.
    """
    import warnings

    warnings.filterwarnings("ignore", message=".*using the `ReadOnly` qualifier", category=UserWarning)


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    model: str
    api_base: str | None
    api_key: str | None
    api_key_env: str | None
    defaults: Mapping[str, Any]          # decoding defaults sent unless a request overrides them
    timeout_s: float
    max_retries: int
    retry_backoff_s: float
    concurrency: int
    rpm: float | None
    tpm: float | None
    extra_headers: Mapping[str, str]
    drop_params: bool
    transport: str

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "_Settings":
        o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
        if "model" not in o:
            raise ValueError("litellm backend: options need a `model`")
        api_key = o.get("api_key")
        api_key_env = o.get("_api_key_env")
        if isinstance(api_key, str) and re.match(ENV_REF_PATTERN, api_key):
            # The caller did not resolve the reference; resolve it here rather than send it as a key.
            api_key_env = api_key_env or api_key[6:-1]
            api_key = os.environ.get(api_key[6:-1])
        defaults = {k: o[k] for k in ("temperature", "top_p", "max_tokens") if k in o}
        return cls(
            model=str(o["model"]), api_base=o.get("api_base"), api_key=api_key, api_key_env=api_key_env,
            defaults=defaults, timeout_s=float(o["timeout_s"]), max_retries=int(o["max_retries"]),
            retry_backoff_s=float(o["retry_backoff_s"]), concurrency=max(1, int(o["concurrency"])),
            rpm=o.get("rpm"), tpm=o.get("tpm"), extra_headers=dict(o.get("extra_headers") or {}),
            drop_params=bool(o["drop_params"]), transport=str(o["transport"]),
        )


# --------------------------------------------------------------------------------------------------
# Failures and rate limiting
# --------------------------------------------------------------------------------------------------


class _Failure(Exception):
    """One failed attempt, classified: may it be retried, after how long, does it doom the run?"""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 retry_after: float | None = None, fatal: bool = False):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.fatal = fatal  # every other request would fail the same way (bad key): stop sending


def _parse_retry_after(headers: Any) -> float | None:
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


class _TokenBucket:
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
        self._rpm = _TokenBucket(rpm / 60.0, rpm / 60.0) if rpm else None
        self._tpm = _TokenBucket(tpm / 60.0, tpm / 60.0) if tpm else None
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


def _estimate_tokens(messages: Sequence[Mapping[str, Any]], max_tokens: Any) -> int:
    """A cheap upper-ish estimate for the tpm limiter: ~4 characters per token plus the answer budget."""
    chars = sum(len(str(m.get("content", ""))) + 8 for m in messages)
    return int(math.ceil(chars / 4)) + (int(max_tokens) if isinstance(max_tokens, int) else 256)


def _redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4 and secret in text:
        text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------------------------------
# The engine shared by both transports
# --------------------------------------------------------------------------------------------------

Send = Callable[[GenRequest, Mapping[str, Any]], Awaitable[tuple[str, int, int]]]


class _Engine:
    def __init__(self, s: _Settings, send: Send, on_result: Callable[[GenResult], None],
                 price: Callable[[int, int], float | None], describe: str, limiter: Any = None):
        self.s = s
        self.send = send
        self.on_result = on_result
        self.price = price
        self.describe = describe  # "model at api_base" for messages
        if limiter is None and (s.rpm or s.tpm):
            # In one process the worker pool already bounds concurrency: only the rates need a limiter.
            limiter = RequestLimiter(None, s.rpm, s.tpm)
        self.limiter = limiter       # None: no limit to wait for, nothing to pay per request
        self.pause_until = 0.0       # set by a 429 with Retry-After: the whole key is throttled
        self.fatal: str | None = None

    async def run(self, requests: Sequence[GenRequest]) -> None:
        import asyncio

        it = iter(requests)  # workers share one iterator; the event loop makes next() atomic

        stopped = False

        async def worker() -> None:
            nonlocal stopped
            for req in it:
                res = await self._one(req)
                if stopped:
                    return  # on_result has raised: the caller wants no more results
                try:
                    self.on_result(res)
                except BaseException:
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

    def _backoff(self, attempt: int) -> float:
        base = min(MAX_BACKOFF_S, self.s.retry_backoff_s * (2 ** attempt))
        return base / 2 + random.uniform(0, base / 2)  # "equal jitter": spread retries, keep a floor

    async def _one(self, req: GenRequest) -> GenResult:
        import asyncio

        s = self.s
        limiter = self.limiter
        params = {**s.defaults, **req.params}
        est = _estimate_tokens(req.messages, params.get("max_tokens")) if limiter is not None else 0
        t0 = time.monotonic()
        attempt = 0
        while True:
            if self.fatal is not None:
                return GenResult(key=req.key, error=self.fatal, latency_s=time.monotonic() - t0)
            wait = self.pause_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if limiter is not None:
                await limiter.acquire(est)
            used = est  # what the attempt cost, until the response says better
            failure: _Failure | None = None
            try:
                try:
                    # The transport has its own timeout; this one is the backstop for anything that
                    # ignores it (a stuck DNS lookup, a provider client that retries internally).
                    async with asyncio.timeout(s.timeout_s + 5.0):
                        text, in_tok, out_tok = await self.send(req, params)
                except TimeoutError:
                    raise _Failure(f"timed out after {s.timeout_s:g} s", retryable=True) from None
                except _Failure:
                    raise
                except Exception as exc:  # unforeseen (a response litellm cannot parse): fail this one
                    raise _Failure(f"{type(exc).__name__}: {_redact(str(exc), s.api_key)[:300]}",
                                   retryable=False) from None
                used = in_tok + out_tok
            except _Failure as f:
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
                    self.fatal = f.message
                if not f.retryable or attempt >= s.max_retries:
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
                await asyncio.sleep(delay)
                continue
            cost = self.price(in_tok, out_tok)
            return GenResult(key=req.key, text=text, input_tokens=in_tok, output_tokens=out_tok,
                             cost=cost or 0.0, latency_s=time.monotonic() - t0)

    def auth_message(self, status: int | None, detail: str) -> str:
        where = (f"the key from environment variable {self.s.api_key_env}" if self.s.api_key_env
                 else "the configured api_key (or the provider's default environment variable)")
        code = f"HTTP {status}" if status else "authentication error"
        detail = _redact(detail, self.s.api_key)
        return (f"authentication failed ({code}) for {self.describe}: the provider rejected {where}"
                + (f": {detail}" if detail else ""))


# --------------------------------------------------------------------------------------------------
# Transports
# --------------------------------------------------------------------------------------------------


def _error_detail(raw: bytes) -> str:
    """The provider's error message, short, from an OpenAI-style error body (or the raw text)."""
    try:
        data = json.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message") if isinstance(err, dict) else err
        text = str(msg)
    except Exception:
        text = raw.decode("utf-8", "replace")
    return text.strip()[:300]


class _DirectTransport:
    """POST the OpenAI chat-completions body on one aiohttp session; parse the JSON by hand."""

    def __init__(self, engine_ref: list, s: _Settings, model_name: str, url: str, api_key: str | None,
                 map_params: Callable[[Mapping[str, Any]], dict[str, Any]]):
        self.engine_ref = engine_ref
        self.s = s
        self.model_name = model_name
        self.url = url
        self.map_params = map_params
        self.headers = {"Content-Type": "application/json", **s.extra_headers}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.session = None
        self._timeout = None
        self._proxy: str | None = None

    async def __aenter__(self):
        import aiohttp

        # One connection per worker, kept alive across requests; no per-request session or DNS work.
        connector = aiohttp.TCPConnector(limit=self.s.concurrency, ttl_dns_cache=300,
                                         enable_cleanup_closed=True)
        # trust_env=False: with it aiohttp looks up proxy settings and .netrc in a worker thread on
        # every request (two thread hops, ~0.4 ms of CPU each here). The proxy for our one URL is
        # resolved once instead, from the same environment variables.
        self.session = aiohttp.ClientSession(connector=connector, trust_env=False)
        self._timeout = aiohttp.ClientTimeout(total=self.s.timeout_s)
        self._proxy = _env_proxy_for(self.url)
        return self

    async def __aexit__(self, *exc):
        await self.session.close()

    async def send(self, req: GenRequest, params: Mapping[str, Any]) -> tuple[str, int, int]:
        import aiohttp

        body = {"model": self.model_name, "messages": [dict(m) for m in req.messages],
                **self.map_params(params)}
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        try:
            async with self.session.post(self.url, data=data, headers=self.headers,
                                         timeout=self._timeout, proxy=self._proxy) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
        except TimeoutError:  # asyncio.TimeoutError is TimeoutError since Python 3.11
            raise _Failure(f"timed out after {self.s.timeout_s:g} s", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise _Failure(f"connection error: {type(exc).__name__}: {exc}", retryable=True) from None
        except OSError as exc:
            raise _Failure(f"connection error: {exc}", retryable=True) from None
        if status >= 400:
            detail = _error_detail(raw)
            if status in AUTH_STATUS:
                raise _Failure(self.engine_ref[0].auth_message(status, detail), retryable=False,
                               status=status, fatal=True)
            retryable = status in RETRYABLE_STATUS
            raise _Failure(f"HTTP {status} from {self.url}: {_redact(detail, self.s.api_key)}",
                           retryable=retryable, status=status,
                           retry_after=_parse_retry_after(headers) if retryable else None)
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            text = choice["message"].get("content")
        except Exception:
            raise _Failure(f"malformed response from {self.url}: {raw[:200]!r}", retryable=True) from None
        if text is None:
            raise _Failure(f"the response has no text (finish_reason={choice.get('finish_reason')!r})",
                           retryable=False)
        usage = payload.get("usage") or {}
        return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class _LiteLLMTransport:
    """Every request through ``litellm.acompletion``, with litellm's retries turned off."""

    def __init__(self, engine_ref: list, s: _Settings):
        self.engine_ref = engine_ref
        self.s = s
        self.litellm = _import_litellm()
        # max_retries (the openai SDK's) and num_retries (litellm's) at 0: our loop is the only retry
        # layer, so attempts are counted once, limits see every attempt and Retry-After is ours to obey.
        self.fixed: dict[str, Any] = {"model": s.model, "timeout": s.timeout_s, "max_retries": 0,
                                      "num_retries": 0}
        if s.api_base:
            self.fixed["api_base"] = s.api_base
        if s.api_key:
            self.fixed["api_key"] = s.api_key
        if s.extra_headers:
            self.fixed["extra_headers"] = dict(s.extra_headers)
        if s.drop_params:
            self.fixed["drop_params"] = True

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    def _classify(self, exc: BaseException) -> _Failure:
        lt = self.litellm
        status = getattr(exc, "status_code", None)
        status = status if isinstance(status, int) else None
        detail = _redact(str(getattr(exc, "message", None) or exc), self.s.api_key)[:300]
        if isinstance(exc, (lt.Timeout, TimeoutError)):
            return _Failure(f"timed out after {self.s.timeout_s:g} s", retryable=True, status=408)
        if isinstance(exc, (lt.AuthenticationError, lt.PermissionDeniedError)) or status in AUTH_STATUS:
            return _Failure(self.engine_ref[0].auth_message(status, detail), retryable=False,
                            status=status, fatal=True)
        if isinstance(exc, lt.APIConnectionError):
            return _Failure(f"connection error: {detail}", retryable=True, status=status)
        if status in RETRYABLE_STATUS or isinstance(exc, (lt.RateLimitError, lt.InternalServerError,
                                                          lt.ServiceUnavailableError)):
            headers = getattr(exc, "litellm_response_headers", None)
            response = getattr(exc, "response", None)
            if headers is None and response is not None:
                headers = getattr(response, "headers", None)
            return _Failure(f"HTTP {status}: {detail}", retryable=True, status=status,
                            retry_after=_parse_retry_after(headers))
        return _Failure(f"{type(exc).__name__}: {detail}", retryable=False, status=status)

    async def send(self, req: GenRequest, params: Mapping[str, Any]) -> tuple[str, int, int]:
        import asyncio

        try:
            # The fixed options win over a request parameter of the same name (model, api_key, ...).
            kwargs = {**params, **self.fixed}
            resp = await self.litellm.acompletion(messages=[dict(m) for m in req.messages], **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._classify(exc) from None
        text = resp.choices[0].message.content
        if text is None:
            raise _Failure(f"the response has no text (finish_reason={resp.choices[0].finish_reason!r})",
                           retryable=False)
        usage = getattr(resp, "usage", None)
        in_tok = int(getattr(usage, "prompt_tokens", 0) or 0)
        out_tok = int(getattr(usage, "completion_tokens", 0) or 0)
        return text, in_tok, out_tok


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


class LiteLLMBackend:
    """Chat completions against any provider litellm supports (see the module docstring)."""

    name = "litellm"
    requires = (("litellm", "litellm"), ("aiohttp", "litellm"))
    version = BACKEND_VERSION
    options_schema = OPTIONS_SCHEMA

    def __init__(self) -> None:
        self._prices: dict[str, tuple[float, float] | None] = {}
        self._prices_lock = threading.Lock()
        self._limiter: Any = None  # set by with_limiter: an executor's shared limiter replaces ours

    # -- contract ---------------------------------------------------------------------------------

    def identity(self, options: Mapping[str, Any]) -> Mapping[str, Any]:
        """Model, endpoint and decoding defaults: what decides the answers. Never the key, and not the
        operational knobs (concurrency, limits, retries, timeouts, transport) that only decide speed."""
        ident: dict[str, Any] = {"backend": self.name, "model": options["model"]}
        if options.get("api_base"):
            ident["api_base"] = str(options["api_base"]).rstrip("/")
        for k in ("temperature", "top_p", "max_tokens", "drop_params"):
            v = options.get(k, DEFAULTS.get(k))
            if v is not None:
                ident[k] = v
        return ident

    def check_options(self, options: Mapping[str, Any]) -> list:
        """What would make every request fail, found without importing litellm (validate stays fast):
        a model name with stray spaces or nothing after an OpenAI-compatible prefix, an api_base that is
        not a usable URL or that already ends in the /chat/completions this backend appends, and
        extra_headers that no HTTP client sends.

        Which provider litellm picks for a model name is not checked: only litellm can tell (its rules
        change between versions), and importing it takes seconds. Nor is the environment (keys, base
        URLs): the machine that validates a spec is often not the one that runs it.
        """
        import urllib.parse

        from specdsl.contract.hookspecs import OptionProblem

        problems = []
        model = str(options.get("model", ""))
        provider, slash, model_name = model.partition("/")
        if model != model.strip():
            problems.append(OptionProblem(("model",), f"model {model!r} starts or ends with spaces; the provider "
                                                      "would not know it", "remove the spaces"))
        elif slash and provider in OPENAI_WIRE_PROVIDERS and not model_name.strip():
            problems.append(OptionProblem(("model",), f"model {model!r} names no model after '{provider}/'",
                                          f"write {provider}/<the model name the server serves>"))

        def control(c: str) -> bool:  # what aiohttp and httpx refuse in a URL or header value
            return (ord(c) < 32 and c != "\t") or ord(c) == 127

        api_base = options.get("api_base")
        if isinstance(api_base, str):
            example = "e.g. http://10.0.0.5:8000/v1"
            try:
                parts = urllib.parse.urlsplit(api_base)
                parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
            except ValueError as exc:
                problems.append(OptionProblem(("api_base",), f"api_base {api_base!r} is not a valid URL: {exc}", example))
            else:
                if any(c.isspace() or control(c) for c in api_base):
                    problems.append(OptionProblem(("api_base",), f"api_base {api_base!r} contains spaces or "
                                                                 "control characters", "remove them"))
                elif not parts.hostname:
                    problems.append(OptionProblem(("api_base",), f"api_base {api_base!r} has no host name", example))
                elif (parts.path.rstrip("/").endswith("/chat/completions") and slash
                      and provider in OPENAI_WIRE_PROVIDERS and options.get("transport", DEFAULTS["transport"]) != "litellm"):
                    # _DirectTransport posts to api_base + "/chat/completions".
                    base = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/")[: -len("/chat/completions")]))
                    problems.append(OptionProblem(
                        ("api_base",), "api_base ends with /chat/completions, which this backend appends itself: "
                                       "every request would go to .../chat/completions/chat/completions",
                        f"give the base URL: api_base: {base}"))

        token = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP field name (RFC 9110 token)
        for name, value in (options.get("extra_headers") or {}).items():
            if not token.match(str(name)):
                problems.append(OptionProblem(("extra_headers", name), f"{str(name)!r} is not a valid HTTP header name",
                                              "header names hold letters, digits and -, no spaces or colons"))
            elif isinstance(value, str) and any(control(c) for c in value):
                problems.append(OptionProblem(("extra_headers", name), f"the value of header '{name}' contains a line "
                                                                       "break or control character; HTTP clients refuse it",
                                              "put the value on one line"))
        return problems

    def price(self, options: Mapping[str, Any], input_tokens: int, output_tokens: int) -> float | None:
        """USD from litellm's local cost map (per-token list prices), or None for an unknown model."""
        p = self._per_token_prices(str(options["model"]))
        if p is None:
            return None
        return input_tokens * p[0] + output_tokens * p[1]

    def generate(self, options: Mapping[str, Any], requests: Sequence[GenRequest],
                 on_result: Callable[[GenResult], None]) -> None:
        """Answer every request; ``on_result`` runs on this call's event loop thread, one at a time.

        An exception raised by ``on_result`` stops the batch (in-flight requests are cancelled) and
        propagates from here. Safe to call from any thread, including one with a running event loop.
        """
        import asyncio

        requests = list(requests)
        if not requests:
            return
        settings = _Settings.from_options(options)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self._agenerate(settings, requests, on_result))
            return
        # Called from async code (a notebook cell): run our loop on a thread of our own.
        box: list[BaseException] = []

        def target() -> None:
            try:
                asyncio.run(self._agenerate(settings, requests, on_result))
            except BaseException as exc:  # handed back to the caller's thread below
                box.append(exc)

        th = threading.Thread(target=target, name="specdsl-litellm", daemon=True)
        th.start()
        th.join()
        if box:
            raise box[0]

    # -- limits shared across processes (the optional LimitedBackend methods) ----------------------------

    def make_limiter(self, options: Mapping[str, Any]) -> RequestLimiter | None:
        """A limiter holding the limits these options set, or None when they set none.

        Only what the model sets is shared: left out, ``concurrency`` stays the per-process default
        (16), so a run that asked for no limit pays nothing for one.
        """
        s = _Settings.from_options(options)
        concurrency = s.concurrency if options.get("concurrency") is not None else None
        if concurrency is None and not s.rpm and not s.tpm:
            return None
        return RequestLimiter(concurrency, s.rpm, s.tpm)

    def with_limiter(self, limiter: Any) -> "LiteLLMBackend":
        """This backend, with every attempt admitted by ``limiter`` (acquire / release / pause) instead
        of its own rate limits. The price cache is shared."""
        twin = copy.copy(self)
        twin._limiter = limiter
        return twin

    # -- internals --------------------------------------------------------------------------------

    def transport_for(self, options: Mapping[str, Any]) -> str:
        """The transport ``generate`` will use for these options: "direct" or "litellm"."""
        s = _Settings.from_options(options)
        return self._resolve(s)[0]

    def _resolve(self, s: _Settings) -> tuple[str, str, str]:
        """(transport, provider, model name as the provider knows it)."""
        litellm = _import_litellm()
        try:
            model_name, provider, _dyn_key, _base = litellm.get_llm_provider(s.model, api_base=s.api_base)
        except Exception as exc:
            if s.transport == "direct":
                raise ValueError(f"litellm cannot resolve the provider of {s.model!r}: {exc}") from None
            return "litellm", "", s.model
        if s.transport == "litellm":
            return "litellm", provider, model_name
        wire = provider in OPENAI_WIRE_PROVIDERS
        if s.transport == "direct" and not wire:
            raise ValueError(f"transport 'direct' needs an OpenAI-compatible provider "
                             f"({', '.join(sorted(OPENAI_WIRE_PROVIDERS))}); {s.model!r} is {provider!r}")
        if wire and provider != "openai" and not (s.api_base or _provider_env_base(provider)):
            return "litellm", provider, model_name  # let litellm report the missing api_base its way
        return ("direct" if wire else "litellm"), provider, model_name

    def _per_token_prices(self, model: str) -> tuple[float, float] | None:
        with self._prices_lock:
            if model in self._prices:
                return self._prices[model]
        litellm = _import_litellm()
        prices: tuple[float, float] | None
        try:
            info = litellm.get_model_info(model)
            pin, pout = info.get("input_cost_per_token"), info.get("output_cost_per_token")
            prices = (float(pin), float(pout)) if pin is not None and pout is not None else None
        except Exception:  # not in the cost map (a self-hosted model): unknown price, not free
            prices = None
        with self._prices_lock:
            self._prices[model] = prices
        return prices

    async def _agenerate(self, s: _Settings, requests: list[GenRequest],
                         on_result: Callable[[GenResult], None]) -> None:
        engine_ref: list[_Engine] = []
        describe = f"model {s.model!r}" + (f" at {s.api_base}" if s.api_base else "")
        self_hosted = _self_hosted(s)
        if self_hosted is not None:
            # A self-hosted OpenAI-compatible server (vLLM, TGI, a local proxy) needs nothing litellm
            # computes: the model name is what follows the prefix and the parameters go as they are.
            # Skipping `import litellm` (3-4 s of CPU) is most of a short run's overhead.
            prices = _cost_map_prices(s.model)
            engine = _Engine(s, None, on_result,
                             lambda i, o: None if prices is None else i * prices[0] + o * prices[1], describe,
                             self._limiter)
            transport = _DirectTransport(engine_ref, s, self_hosted, s.api_base.rstrip("/") + "/chat/completions",
                                         s.api_key, _send_as_is)
            engine.send = transport.send
            engine_ref.append(engine)
            async with transport:
                await engine.run(requests)
            return
        prices = self._per_token_prices(s.model)

        def price(i: int, o: int) -> float | None:
            return None if prices is None else i * prices[0] + o * prices[1]

        try:
            transport_name, provider, model_name = self._resolve(s)
        except ValueError as exc:
            for r in requests:
                on_result(GenResult(key=r.key, error=str(exc)))
            return
        if transport_name == "direct":
            s, transport = self._direct(engine_ref, s, provider, model_name)
        else:
            transport = _LiteLLMTransport(engine_ref, s)
        engine = _Engine(s, transport.send, on_result, price, describe, self._limiter)
        engine_ref.append(engine)
        async with transport:
            await engine.run(requests)

    def _direct(self, engine_ref: list, s: _Settings, provider: str,
                model_name: str) -> tuple[_Settings, _DirectTransport]:
        litellm = _import_litellm()
        base = s.api_base or _provider_env_base(provider) or "https://api.openai.com/v1"
        url = base.rstrip("/") + "/chat/completions"
        api_key = s.api_key
        if api_key is None:
            env = {"openai": "OPENAI_API_KEY", "hosted_vllm": "HOSTED_VLLM_API_KEY"}.get(provider)
            if env:
                api_key = os.environ.get(env) or getattr(litellm, "api_key", None)
                if s.api_key_env is None and os.environ.get(env):
                    s = _replace(s, api_key_env=env)
        cache: dict[str, dict[str, Any]] = {}

        def map_params(params: Mapping[str, Any]) -> dict[str, Any]:
            # litellm knows which OpenAI parameters each model takes (max_tokens vs
            # max_completion_tokens, no temperature on reasoning models, ...). The answer depends only
            # on the parameter set, so it is computed once per distinct set, not once per request.
            ck = json.dumps(params, sort_keys=True, default=str)
            hit = cache.get(ck)
            if hit is None:
                try:
                    mapped = litellm.get_optional_params(model=model_name, custom_llm_provider=provider,
                                                         drop_params=s.drop_params or None, **params)
                except Exception as exc:
                    msg = _first_line(exc)
                    if "drop_params" in str(exc):
                        msg += " (set `drop_params: true` on the model to drop unsupported parameters)"
                    raise _Failure(f"invalid parameters for {s.model!r}: {msg}", retryable=False) from None
                mapped = {k: v for k, v in mapped.items() if v is not None and k != "stream"}
                extra = mapped.pop("extra_body", None) or {}
                hit = {**mapped, **extra}
                cache[ck] = hit
            return hit

        return s, _DirectTransport(engine_ref, s, model_name, url, api_key, map_params)


# Prefixes that say "a server of mine speaking OpenAI's wire format": litellm maps no parameter for them.
# (`openai/` models keep going through litellm even at a custom api_base: a gateway may front OpenAI's
# own models, whose parameters litellm rewrites, e.g. max_tokens -> max_completion_tokens.)
SELF_HOSTED_PROVIDERS = frozenset({"hosted_vllm", "custom_openai"})


def _self_hosted(s: _Settings) -> str | None:
    """The model name to send when litellm has nothing to add, else None."""
    if s.transport == "litellm" or not s.api_base or s.drop_params:
        return None
    provider, _, name = s.model.partition("/")
    if provider not in SELF_HOSTED_PROVIDERS or not name:
        return None
    return name


def _send_as_is(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


_COST_MAP: dict[str, Any] | None = None


def _cost_map_prices(model: str) -> tuple[float, float] | None:
    """Per-token prices from litellm's bundled cost map, read as data (no ``import litellm``)."""
    global _COST_MAP
    if _COST_MAP is None:
        import importlib.util

        _COST_MAP = {}
        spec = importlib.util.find_spec("litellm")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(folder, "model_prices_and_context_window_backup.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    _COST_MAP = json.load(fh)
                break
    for name in (model, model.partition("/")[2]):
        info = _COST_MAP.get(name)
        if isinstance(info, dict) and info.get("input_cost_per_token") is not None \
                and info.get("output_cost_per_token") is not None:
            return float(info["input_cost_per_token"]), float(info["output_cost_per_token"])
    return None


def _env_proxy_for(url: str) -> str | None:
    """The proxy the environment (HTTP(S)_PROXY, NO_PROXY) asks for this URL, as aiohttp would pick."""
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    return proxy or None


def _provider_env_base(provider: str) -> str | None:
    env = {"openai": ("OPENAI_BASE_URL", "OPENAI_API_BASE"), "hosted_vllm": ("HOSTED_VLLM_API_BASE",),
           "custom_openai": ()}.get(provider, ())
    for name in env:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _replace(s: _Settings, **changes: Any) -> _Settings:
    from dataclasses import replace

    return replace(s, **changes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
