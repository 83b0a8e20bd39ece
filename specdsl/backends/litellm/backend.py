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
import os
import threading
from typing import Any, Callable, Mapping, Sequence

from specdsl.backends.litellm.engine import (AUTH_STATUS, RETRYABLE_STATUS, Engine, Failure, first_line,
                                             parse_retry_after, redact_secret)
from specdsl.backends.litellm.limiter import RequestLimiter
from specdsl.backends.litellm.loader import import_litellm
from specdsl.backends.litellm.options import (DEFAULTS, OPENAI_WIRE_PROVIDERS, OPTIONS_SCHEMA, Settings,
                                              check_options)
from specdsl.contract.hookspecs import GenRequest, GenResult

_Settings = Settings  # the name tests knew it by

# Our own version: it feeds node fingerprints. litellm's version is deliberately NOT part of it, nor of
# identity(): the provider, not the client library, decides the answer, and upgrading litellm must not
# invalidate (and re-bill) every cached generation.
BACKEND_VERSION = "1"


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
            raise Failure(f"timed out after {self.s.timeout_s:g} s", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise Failure(f"connection error: {type(exc).__name__}: {exc}", retryable=True) from None
        except OSError as exc:
            raise Failure(f"connection error: {exc}", retryable=True) from None
        if status >= 400:
            detail = _error_detail(raw)
            if status in AUTH_STATUS:
                raise Failure(self.engine_ref[0].auth_message(status, detail), retryable=False,
                               status=status, fatal=True)
            retryable = status in RETRYABLE_STATUS
            raise Failure(f"HTTP {status} from {self.url}: {redact_secret(detail, self.s.api_key)}",
                           retryable=retryable, status=status,
                           retry_after=parse_retry_after(headers) if retryable else None)
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            text = choice["message"].get("content")
        except Exception:
            raise Failure(f"malformed response from {self.url}: {raw[:200]!r}", retryable=True) from None
        if text is None:
            raise Failure(f"the response has no text (finish_reason={choice.get('finish_reason')!r})",
                           retryable=False)
        usage = payload.get("usage") or {}
        return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class _LiteLLMTransport:
    """Every request through ``litellm.acompletion``, with litellm's retries turned off."""

    def __init__(self, engine_ref: list, s: _Settings):
        self.engine_ref = engine_ref
        self.s = s
        self.litellm = import_litellm()
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

    def _classify(self, exc: BaseException) -> Failure:
        lt = self.litellm
        status = getattr(exc, "status_code", None)
        status = status if isinstance(status, int) else None
        detail = redact_secret(str(getattr(exc, "message", None) or exc), self.s.api_key)[:300]
        if isinstance(exc, (lt.Timeout, TimeoutError)):
            return Failure(f"timed out after {self.s.timeout_s:g} s", retryable=True, status=408)
        if isinstance(exc, (lt.AuthenticationError, lt.PermissionDeniedError)) or status in AUTH_STATUS:
            return Failure(self.engine_ref[0].auth_message(status, detail), retryable=False,
                            status=status, fatal=True)
        if isinstance(exc, lt.APIConnectionError):
            return Failure(f"connection error: {detail}", retryable=True, status=status)
        if status in RETRYABLE_STATUS or isinstance(exc, (lt.RateLimitError, lt.InternalServerError,
                                                          lt.ServiceUnavailableError)):
            headers = getattr(exc, "litellm_response_headers", None)
            response = getattr(exc, "response", None)
            if headers is None and response is not None:
                headers = getattr(response, "headers", None)
            return Failure(f"HTTP {status}: {detail}", retryable=True, status=status,
                            retry_after=parse_retry_after(headers))
        return Failure(f"{type(exc).__name__}: {detail}", retryable=False, status=status)

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
            raise Failure(f"the response has no text (finish_reason={resp.choices[0].finish_reason!r})",
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
        """Problems that would make every request fail, found without importing litellm (see
        :func:`specdsl.backends.litellm.options.check_options`)."""
        return check_options(options)

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
        litellm = import_litellm()
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
        litellm = import_litellm()
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
        engine_ref: list[Engine] = []
        describe = f"model {s.model!r}" + (f" at {s.api_base}" if s.api_base else "")
        self_hosted = _self_hosted(s)
        if self_hosted is not None:
            # A self-hosted OpenAI-compatible server (vLLM, TGI, a local proxy) needs nothing litellm
            # computes: the model name is what follows the prefix and the parameters go as they are.
            # Skipping `import litellm` (3-4 s of CPU) is most of a short run's overhead.
            prices = _cost_map_prices(s.model)
            engine = Engine(s, None, on_result,
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
        engine = Engine(s, transport.send, on_result, price, describe, self._limiter)
        engine_ref.append(engine)
        async with transport:
            await engine.run(requests)

    def _direct(self, engine_ref: list, s: _Settings, provider: str,
                model_name: str) -> tuple[_Settings, _DirectTransport]:
        litellm = import_litellm()
        base = s.api_base or _provider_env_base(provider) or "https://api.openai.com/v1"
        url = base.rstrip("/") + "/chat/completions"
        api_key = s.api_key
        if api_key is None:
            env = {"openai": "OPENAI_API_KEY", "hosted_vllm": "HOSTED_VLLM_API_KEY"}.get(provider)
            if env:
                api_key = os.environ.get(env) or getattr(litellm, "api_key", None)
                if s.api_key_env is None and os.environ.get(env):
                    s = s.replace(api_key_env=env)
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
                    msg = first_line(exc)
                    if "drop_params" in str(exc):
                        msg += " (set `drop_params: true` on the model to drop unsupported parameters)"
                    raise Failure(f"invalid parameters for {s.model!r}: {msg}", retryable=False) from None
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


