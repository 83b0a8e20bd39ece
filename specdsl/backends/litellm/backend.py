"""Generation through LLM provider APIs, with litellm doing provider translation and pricing.

``LiteLLMBackend`` answers a batch of chat requests with bounded concurrency, requests-per-minute and
tokens-per-minute limits, and its own retry loop (exponential backoff with jitter, ``Retry-After``
honoured). Each result is handed to ``on_result`` the moment it completes, so the caller can persist
it before the next one arrives.

The package, one concern a module
---------------------------------
``options``     the options schema, defaults, ``Settings`` and the checks ``specdsl validate`` runs
``engine``      the request loop: workers, retries, backoff, failures classified
``limiter``     concurrency / rpm / tpm admission, Retry-After pauses
``transports``  ``litellm`` (any provider) or ``direct`` (one aiohttp session, OpenAI wire format); how
                ``transport: auto`` picks one
``preflight``   one ``GET {api_base}/models`` before a batch: a dead server or an unknown model, early
``pricing``     per-token prices from litellm's local cost map
``loader``      the one ``import litellm`` (offline, quiet)

Limits
------
``concurrency`` is the size of the worker pool, so in one process it bounds requests in flight with no
extra work; ``rpm`` and ``tpm`` go through a :class:`RequestLimiter`. An executor that spreads one model's
requests over several processes (Ray) shares the limits the model sets instead: :meth:`LiteLLMBackend.make_limiter`
builds the limiter it hosts, and :meth:`LiteLLMBackend.with_limiter` returns a backend whose every attempt
is admitted by that shared limiter (see ``LimitedBackend`` in :mod:`specdsl.contract.hookspecs`).

Importing this package is cheap: asyncio, litellm and aiohttp are imported inside the functions that run
(asyncio alone is ~20 ms of ``specdsl validate``, which never generates).
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable, Mapping, Sequence

from specdsl.backends.litellm.engine import Engine
from specdsl.backends.litellm.limiter import RequestLimiter
from specdsl.backends.litellm.options import DEFAULTS, OPTIONS_SCHEMA, Settings, check_options
from specdsl.backends.litellm.preflight import run_checked
from specdsl.backends.litellm.pricing import PriceTable, cost, cost_map_prices
from specdsl.backends.litellm.transports import (LiteLLMTransport, direct_transport, resolve_transport,
                                                 self_hosted_model, self_hosted_transport)
from specdsl.contract.hookspecs import GenRequest, GenResult

# Our own version: it feeds node fingerprints. litellm's version is deliberately NOT part of it, nor of
# identity(): the provider, not the client library, decides the answer, and upgrading litellm must not
# invalidate (and re-bill) every cached generation.
BACKEND_VERSION = "1"


class LiteLLMBackend:
    """Chat completions against any provider litellm supports (see the module docstring)."""

    name = "litellm"
    requires = (("litellm", "litellm"), ("aiohttp", "litellm"))
    version = BACKEND_VERSION
    options_schema = OPTIONS_SCHEMA

    def __init__(self) -> None:
        self._prices = PriceTable()
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
        if self_hosted_model(Settings.from_options(options)) is not None:
            # What generate() charges a self-hosted server with, without importing litellm (3-4 s).
            return cost(cost_map_prices(str(options["model"])), input_tokens, output_tokens)
        return cost(self._prices.per_token(str(options["model"])), input_tokens, output_tokens)

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
        settings = Settings.from_options(options)
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
        s = Settings.from_options(options)
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
        s = Settings.from_options(options)
        if self_hosted_model(s) is not None:
            return "direct"  # decided without importing litellm, as generate() does
        return resolve_transport(s)[0]

    async def _agenerate(self, s: Settings, requests: list[GenRequest],
                         on_result: Callable[[GenResult], None]) -> None:
        engine_ref: list[Engine] = []
        try:
            describe = f"model {s.model!r}" + (f" at {s.api_base}" if s.api_base else "")
            self_hosted = self_hosted_model(s)
            if self_hosted is not None:
                # A self-hosted OpenAI-compatible server (vLLM, TGI, a local proxy) needs nothing litellm
                # computes: the model name is what follows the prefix and the parameters go as they are.
                # Skipping `import litellm` (3-4 s of CPU) is most of a short run's overhead.
                prices = cost_map_prices(s.model)
                s, transport = self_hosted_transport(engine_ref, s, self_hosted)
                engine = Engine(s, transport.send, on_result, lambda i, o: cost(prices, i, o), describe,
                                self._limiter, backstop=False)
                engine_ref.append(engine)
                async with transport:
                    await run_checked(engine, s, requests, provider=s.model.partition("/")[0],
                                      model_name=self_hosted, headers=transport.headers, on_result=on_result)
                return
            prices = self._prices.per_token(s.model)

            try:
                transport_name, provider, model_name = resolve_transport(s)
            except ValueError as exc:
                for r in requests:
                    on_result(GenResult(key=r.key, error=str(exc)))
                return
            if transport_name == "direct":
                s, transport = direct_transport(engine_ref, s, provider, model_name)
            else:
                transport = LiteLLMTransport(engine_ref, s)
            engine = Engine(s, transport.send, on_result, lambda i, o: cost(prices, i, o), describe,
                            self._limiter, backstop=transport_name != "direct")
            engine_ref.append(engine)
            async with transport:
                await run_checked(engine, s, requests, provider=provider, model_name=model_name,
                                  headers=getattr(transport, "headers", None) or _auth_headers(s),
                                  on_result=on_result)
        finally:
            # The transport and the engine refer to each other through engine_ref: a cycle that would keep
            # the engine's on_result, and through it the caller's every request and result, alive until
            # the collector's next full pass (at exit, 0.1 s for 20,000 requests). Broken, they are freed
            # as soon as the caller lets go of them.
            engine_ref.clear()


def _auth_headers(s: Settings) -> dict[str, str]:
    """The headers a request through litellm would carry to an OpenAI-compatible server."""
    return {**s.extra_headers, **({"Authorization": f"Bearer {s.api_key}"} if s.api_key else {})}

