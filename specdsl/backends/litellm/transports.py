"""How requests reach the provider, and how ``transport: auto`` picks the way.

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
``auto``     (default) ``direct`` for a self-hosted server: an OpenAI-wire provider (``hosted_vllm/``,
             ``custom_openai/``, ``openai/``) at an explicit ``api_base`` (the option, or the provider's
             base-URL variable) that is not the provider's own API; ``litellm`` for everything else, the
             provider APIs included (``openai/...`` to api.openai.com): their headers (``OpenAI-Organization``),
             callbacks and parameter rules are litellm's business. :func:`auto_picks_direct` is the rule.

A self-hosted OpenAI-compatible server (``hosted_vllm/`` or ``custom_openai/`` with an ``api_base``, or
``openai/<its own model>`` at an ``api_base`` that is not OpenAI's) gets the direct transport without
litellm at all: nothing litellm computes applies to it (:func:`self_hosted_model` is the rule).

aiohttp and litellm are imported where a transport starts, not here.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any, Callable, Mapping, Sequence

from specdsl.backends.litellm.engine import AUTH_STATUS, RETRYABLE_STATUS, Failure, first_line, parse_retry_after
from specdsl.backends.litellm.loader import import_litellm
from specdsl.backends.litellm.options import OPENAI_WIRE_PROVIDERS, Settings
from specdsl.backends.litellm.pricing import litellm_maps_openai_params
from specdsl.contract.hookspecs import GenRequest
from specdsl.secrets import excerpt
from specdsl.jsontext import messages_json


def error_detail(raw: bytes, secrets: Sequence[str]) -> str:
    """The provider's error message, short, from the error body's usual shapes, else the raw body.

    Shapes: OpenAI and the litellm proxy ``{"error": {"message": ...}}``; vLLM ``{"object": "error",
    "message": ...}``; FastAPI, as ``transformers serve`` answers, ``{"detail": "..."}`` or a list of
    ``{"loc", "msg"}``; TGI ``{"error": "..."}``. Redacted and cut by :func:`specdsl.secrets.excerpt`.
    """
    text = raw.decode("utf-8", "replace").strip()
    try:
        message = _message_of(json.loads(raw))
    except Exception:
        message = None
    return excerpt((message or text or "(empty body)").strip(), secrets)


def _message_of(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    if isinstance(err, dict):
        return _message_of(err) or _message_of({"message": err.get("type")})
    for key in ("message", "detail", "error", "msg"):
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value:  # FastAPI validation errors
            parts = [f"{'.'.join(str(x) for x in v.get('loc', []))}: {v.get('msg')}" if isinstance(v, dict)
                     else str(v) for v in value]
            return "; ".join(parts)
        if isinstance(value, dict) and (inner := _message_of(value)):
            return inner
    return None


class DirectTransport:
    """POST the OpenAI chat-completions body on one aiohttp session; parse the JSON by hand."""

    def __init__(self, engine_ref: list, s: Settings, model_name: str, url: str, api_key: str | None,
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
        # The body's JSON around the messages, per distinct parameter set (see _body).
        self._head = '{"model": ' + json.dumps(model_name, ensure_ascii=False) + ', "messages": '
        self._tails: dict[tuple, str] = {}

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
        self._proxy = env_proxy_for(self.url)
        return self

    async def __aexit__(self, *exc):
        await self.session.close()

    def _body(self, req: GenRequest, params: Mapping[str, Any]) -> bytes:
        """``{"model": ..., "messages": [...], **mapped parameters}`` as JSON bytes. A step sends the same
        parameters with nearly every request: their mapping and encoding are done once per distinct set
        (a few hundred at most are remembered), only the messages are encoded per request."""
        try:
            key = tuple((k, type(v), v) for k, v in params.items())  # typed: 0, 0.0 and False encode apart
            tail = self._tails.get(key)
        except TypeError:  # an unhashable parameter value (a list of stop strings): not remembered
            key, tail = None, None
        if tail is None:
            mapped = self.map_params(params)
            if "model" in mapped or "messages" in mapped:  # they would replace the fields above, in place
                return json.dumps({"model": self.model_name, "messages": [dict(m) for m in req.messages],
                                   **mapped}, ensure_ascii=False).encode("utf-8")
            tail = ", " + json.dumps(mapped, ensure_ascii=False)[1:] if mapped else "}"
            if key is not None and len(self._tails) < 256:
                self._tails[key] = tail
        return (self._head + messages_json(req.messages) + tail).encode("utf-8")

    async def send(self, req: GenRequest, params: Mapping[str, Any]) -> tuple[str, int, int]:
        import aiohttp

        data = self._body(req, params)
        try:
            async with self.session.post(self.url, data=data, headers=self.headers,
                                         timeout=self._timeout, proxy=self._proxy) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
        except TimeoutError:  # asyncio.TimeoutError is TimeoutError since Python 3.11
            raise Failure(f"timed out after {self.s.timeout_s:g} s", retryable=True) from None
        except aiohttp.ClientConnectorError as exc:  # no connection made: refused, no route, unknown host
            raise Failure(f"connection error: {type(exc).__name__}: {exc}", retryable=True,
                          unreachable=True) from None
        except aiohttp.ClientError as exc:
            raise Failure(f"connection error: {type(exc).__name__}: {exc}", retryable=True) from None
        except OSError as exc:
            raise Failure(f"connection error: {exc}", retryable=True,
                          unreachable=isinstance(exc, (ConnectionRefusedError, socket.gaierror))) from None
        if status >= 400:
            detail = error_detail(raw, self.s.secrets)
            if status in AUTH_STATUS:
                raise Failure(self.engine_ref[0].auth_message(status, detail), retryable=False,
                              status=status, fatal=True)
            retryable = status in RETRYABLE_STATUS
            raise Failure(f"HTTP {status} from {self.url}: {detail}",
                          retryable=retryable, status=status,
                          retry_after=parse_retry_after(headers) if retryable else None)
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            text = choice["message"].get("content")
        except Exception:
            shown = excerpt(raw.decode("utf-8", "replace"), self.s.secrets, limit=200)
            raise Failure(f"malformed response from {self.url}: {shown!r}", retryable=True) from None
        if text is None:
            raise Failure(f"the response has no text (finish_reason={choice.get('finish_reason')!r})",
                          retryable=False)
        usage = payload.get("usage") or {}
        return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class LiteLLMTransport:
    """Every request through ``litellm.acompletion``, with litellm's retries turned off."""

    def __init__(self, engine_ref: list, s: Settings):
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
        detail = excerpt(str(getattr(exc, "message", None) or exc), self.s.secrets)
        if isinstance(exc, (lt.Timeout, TimeoutError)):
            return Failure(f"timed out after {self.s.timeout_s:g} s", retryable=True, status=408)
        if is_missing_credentials(exc):
            # litellm raises this before any request is made (as an "HTTP 500" for openai/): retrying
            # cannot help, and every other request would fail the same way.
            return Failure(missing_key_message(self.s, detail), retryable=False, fatal=True)
        if could_not_connect(exc):
            return Failure(f"connection error: {detail}", retryable=True, status=status, unreachable=True)
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


_MISSING_KEY = re.compile(r"(?i)missing credentials|missing [\w ]*api[ _]key|api_key client option must be set|"
                          r"no api key|api key (?:is )?(?:not set|required)")
_NO_CONNECTION = re.compile(r"(?i)connection refused|cannot connect to host|connect call failed|"
                            r"all connection attempts failed|name or service not known|nodename nor servname|"
                            r"no route to host|network is unreachable|^(?:\S+: )*connection error\.?$")


def is_missing_credentials(exc: BaseException) -> bool:
    """litellm's configuration errors about a key (none given, none in the environment)."""
    return bool(_MISSING_KEY.search(str(getattr(exc, "message", None) or exc)))


def could_not_connect(exc: BaseException) -> bool:
    """No connection was made at all: refused, no route, unknown host (anywhere in the exception chain)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ConnectionRefusedError, socket.gaierror)) or \
                type(cur).__name__ in ("ConnectError", "ClientConnectorError", "ClientConnectorDNSError"):
            return True
        text = str(getattr(cur, "message", None) or cur).strip()
        if _NO_CONNECTION.search(text.rsplit(" - ", 1)[-1]) or _NO_CONNECTION.search(text):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def missing_key_message(s: Settings, detail: str) -> str:
    """A configuration error naming where the key should come from."""
    provider = s.model.partition("/")[0] if "/" in s.model else "the provider"
    env = s.api_key_env or {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY",
                            "gemini": "GEMINI_API_KEY", "hosted_vllm": "HOSTED_VLLM_API_KEY",
                            "mistral": "MISTRAL_API_KEY", "groq": "GROQ_API_KEY"}.get(provider)
    where = (f"set `api_key: ${{env:{env}}}` on the model and export {env}" if env
             else "set `api_key: ${env:NAME}` on the model and export NAME")
    return (f"no API key for model {s.model!r} (a configuration error; no request was sent): {where}"
            + (f" [{detail}]" if detail else ""))


def resolve_transport(s: Settings) -> tuple[str, str, str]:
    """(transport, provider, model name as the provider knows it): how ``auto`` picks a transport, and
    whether ``direct`` can be honoured. Imports litellm (its provider rules decide)."""
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
    if s.transport == "auto":
        return ("direct" if auto_picks_direct(provider, s.api_base) else "litellm"), provider, model_name
    if provider != "openai" and not (s.api_base or provider_env_base(provider)):
        return "litellm", provider, model_name  # let litellm report the missing api_base its way
    return "direct", provider, model_name


# Hosts of provider APIs: an `api_base` naming one is the provider itself, not a self-hosted server.
PROVIDER_API_HOSTS = frozenset({"api.openai.com"})


def auto_picks_direct(provider: str, api_base: str | None) -> bool:
    """The ``auto`` rule: the direct aiohttp path only for a self-hosted server that speaks the OpenAI wire
    format, i.e. an OpenAI-wire provider at an explicit base URL (``api_base``, or the provider's base-URL
    variable) that is not a provider's own API. Provider APIs go through litellm."""
    import urllib.parse

    if provider not in OPENAI_WIRE_PROVIDERS:
        return False
    base = api_base or provider_env_base(provider)
    if not base:
        return False
    host = (urllib.parse.urlsplit(base).hostname or "").lower()
    return host not in PROVIDER_API_HOSTS


def direct_transport(engine_ref: list, s: Settings, provider: str,
                     model_name: str) -> tuple[Settings, DirectTransport]:
    """The direct transport for a provider litellm resolved: its endpoint, its key (the provider's usual
    variable when the options name none, remembered in the settings for error messages) and litellm's
    parameter mapping, cached per distinct parameter set."""
    litellm = import_litellm()
    base = s.api_base or provider_env_base(provider) or "https://api.openai.com/v1"
    url = base.rstrip("/") + "/chat/completions"
    api_key = s.api_key
    if api_key is None:
        env = {"openai": "OPENAI_API_KEY", "hosted_vllm": "HOSTED_VLLM_API_KEY"}.get(provider)
        if env:
            api_key = os.environ.get(env) or getattr(litellm, "api_key", None)
            if s.api_key_env is None and os.environ.get(env):
                s = s.replace(api_key_env=env)
            if api_key:  # a key from the environment is as secret as one from the options
                s = s.replace(secrets=s.secrets + (api_key,))
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

    return s, DirectTransport(engine_ref, s, model_name, url, api_key, map_params)


# Prefixes that say "a server of mine speaking OpenAI's wire format": litellm maps no parameter for them.
SELF_HOSTED_PROVIDERS = frozenset({"hosted_vllm", "custom_openai"})


def self_hosted_model(s: Settings) -> str | None:
    """The model name to send when litellm has nothing to add, else None.

    ``hosted_vllm/`` and ``custom_openai/`` at an ``api_base``; and ``openai/<name>`` at an ``api_base``
    that is not OpenAI's own API, for a name litellm would send unchanged (see
    :func:`~specdsl.backends.litellm.pricing.litellm_maps_openai_params`). A gateway in front of OpenAI's
    own models (``openai/o3-mini``, ``openai/gpt-4o``) keeps litellm's per-model parameter rules."""
    if s.transport == "litellm" or not s.api_base or s.drop_params:
        return None
    provider, _, name = s.model.partition("/")
    if not name:
        return None
    if provider in SELF_HOSTED_PROVIDERS:
        return name
    if provider == "openai" and auto_picks_direct(provider, s.api_base) and not litellm_maps_openai_params(name):
        return name
    return None


def send_as_is(params: Mapping[str, Any]) -> dict[str, Any]:
    """The request parameters as a self-hosted server takes them: unmapped, unset ones left out."""
    return {k: v for k, v in params.items() if v is not None}


def self_hosted_transport(engine_ref: list, s: Settings, model_name: str) -> tuple[Settings, DirectTransport]:
    """The direct transport for a self-hosted server (see :func:`self_hosted_model`): no litellm at all.
    An ``openai/`` model without an ``api_key`` option takes OPENAI_API_KEY, as litellm would."""
    api_key = s.api_key
    if api_key is None and s.model.startswith("openai/") and os.environ.get("OPENAI_API_KEY"):
        api_key = os.environ["OPENAI_API_KEY"]
        s = s.replace(api_key_env=s.api_key_env or "OPENAI_API_KEY", secrets=s.secrets + (api_key,))
    return s, DirectTransport(engine_ref, s, model_name, s.api_base.rstrip("/") + "/chat/completions", api_key,
                              send_as_is)


def env_proxy_for(url: str) -> str | None:
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


def provider_env_base(provider: str) -> str | None:
    """The base URL the provider's usual environment variable sets, as litellm would read it."""
    env = {"openai": ("OPENAI_BASE_URL", "OPENAI_API_BASE"), "hosted_vllm": ("HOSTED_VLLM_API_BASE",),
           "custom_openai": ()}.get(provider, ())
    for name in env:
        if os.environ.get(name):
            return os.environ[name]
    return None

