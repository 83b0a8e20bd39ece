"""The preflight: one ``GET {api_base}/models`` before a batch goes to a self-hosted server.

It catches two mistakes before they cost a request per row:

* a server that cannot be reached (nothing listening, an unknown host): every request of the batch
  fails at once with the circuit breaker's message, instead of after the breaker's run of attempts;
* a model name the server does not list: one request is sent first, alone. Servers that load models on
  demand (``transformers serve`` started without a model, a proxy with wildcard routes) list only what
  they hold, so an unlisted name is not wrong by itself; but if that first request fails too, the rest
  are not sent, and every row fails with one message naming the models the server does list.

Anything else (no ``/models`` route: 404, 405; a 401 or a 5xx; a slow answer; a body that is not the
OpenAI list) tells nothing, and the batch goes ahead as if there were no preflight. ``preflight: false``
on the model turns it off. aiohttp is imported where the check runs.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from specdsl.backends.litellm.options import OPENAI_WIRE_PROVIDERS, Settings
from specdsl.contract.hookspecs import GenRequest, GenResult
from specdsl.secrets import excerpt

# The preflight must not slow a healthy run: a server that takes longer than this to list its models is
# given the benefit of the doubt.
PREFLIGHT_TIMEOUT_S = 5.0
# Models named in a message at most (a gateway may list hundreds).
MAX_NAMES_SHOWN = 12


@dataclass(frozen=True)
class Verdict:
    """What ``GET /models`` said: ``unreachable`` (the message to fail with), or the listed models (empty
    when the answer tells nothing)."""

    url: str
    unreachable: str | None = None
    listed: tuple[str, ...] = ()


def preflight_base(s: Settings, provider: str) -> str | None:
    """The base URL to check, or None when there is no preflight for these settings: it is off, there is
    no ``api_base``, the provider does not speak the OpenAI wire format, or the base is a provider's own
    API (which lists models it serves under other names, and answers a wrong one clearly anyway)."""
    from specdsl.backends.litellm.transports import PROVIDER_API_HOSTS

    if not s.preflight or not s.api_base or provider not in OPENAI_WIRE_PROVIDERS:
        return None
    host = (urllib.parse.urlsplit(s.api_base).hostname or "").lower()
    return None if host in PROVIDER_API_HOSTS else s.api_base.rstrip("/")


async def check(s: Settings, base: str, headers: Mapping[str, str], describe: str) -> Verdict:
    """``GET {base}/models`` once, with a short timeout."""
    import aiohttp

    from specdsl.backends.litellm.transports import env_proxy_for

    url = f"{base}/models"
    timeout = aiohttp.ClientTimeout(total=min(PREFLIGHT_TIMEOUT_S, s.timeout_s))
    try:
        async with aiohttp.ClientSession(trust_env=False) as session:
            async with session.get(url, headers=dict(headers), timeout=timeout, proxy=env_proxy_for(url)) as resp:
                if resp.status != 200:
                    return Verdict(url)
                raw = await resp.read()
    except (aiohttp.ClientConnectorError, ConnectionRefusedError, socket.gaierror) as exc:
        detail = excerpt(f"{type(exc).__name__}: {exc}", s.secrets)
        return Verdict(url, unreachable=f"cannot reach {describe}: connection error: {detail} (GET {url} could "
                                        "not connect; is the server running?)")
    except Exception:  # noqa: BLE001 - a timeout, a dropped connection: the batch decides, as without us
        return Verdict(url)
    return Verdict(url, listed=listed_models(raw))


def listed_models(raw: bytes) -> tuple[str, ...]:
    """The ids of an OpenAI model list (``{"data": [{"id": ...}, ...]}``); () for anything else."""
    try:
        data = json.loads(raw).get("data")
    except Exception:  # noqa: BLE001 - not JSON, not an object
        return ()
    if not isinstance(data, list):
        return ()
    return tuple(str(m["id"]) for m in data if isinstance(m, dict) and isinstance(m.get("id"), (str, int)))


def unlisted_message(s: Settings, model_name: str, verdict: Verdict, first_error: str) -> str:
    """Every row's error when the server lists other models and refused the first request."""
    names = ", ".join(repr(n) for n in verdict.listed[:MAX_NAMES_SHOWN])
    more = f" and {len(verdict.listed) - MAX_NAMES_SHOWN} more" if len(verdict.listed) > MAX_NAMES_SHOWN else ""
    prefix = s.model.partition("/")[0]
    return (f"model {s.model!r}: the server at {s.api_base} does not list {model_name!r} (GET {verdict.url} lists "
            f"{names}{more}) and refused the first request: {first_error}; the other requests were not sent. "
            f"Name a model the server serves, e.g. `model: {prefix}/{verdict.listed[0]}`")


async def run_checked(engine: Any, s: Settings, requests: Sequence[GenRequest], *, provider: str, model_name: str,
                      headers: Mapping[str, str], on_result: Callable[[GenResult], None]) -> None:
    """``engine.run(requests)``, after the preflight when these settings call for one."""
    base = preflight_base(s, provider)
    if base is None or not requests:
        await engine.run(requests)
        return
    verdict = await check(s, base, headers, engine.describe)
    if verdict.unreachable is not None:
        for r in requests:
            on_result(GenResult(key=r.key, error=verdict.unreachable))
        return
    if not verdict.listed or model_name in verdict.listed:
        await engine.run(requests)
        return
    # Not listed: maybe loaded on demand. One request alone tells; its result is held back until it does.
    held: list[GenResult] = []
    engine.on_result = held.append
    try:
        await engine.run(requests[:1])
    finally:
        engine.on_result = on_result
    first = held[0] if held else None
    if first is None or first.ok or engine.fatal is not None:
        # Answered (the name works), or failed for a reason every request shares (a bad key): as usual.
        for res in held:
            on_result(res)
        if len(requests) > 1:
            await engine.run(requests[1:])
        return
    message = unlisted_message(s, model_name, verdict, first.error or "")
    on_result(replace(first, error=message))
    for r in requests[1:]:
        on_result(GenResult(key=r.key, error=message))
