"""The litellm backend's options: their JSON Schema, defaults, the settings one run reads from them, and
the checks ``specdsl validate`` runs on them (api_base and model-name forms).

Nothing here imports litellm: validating a spec stays fast.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from specdsl.secrets import ENV_REF_PATTERN, env_ref_name, resolved_secrets

# Providers whose chat endpoint is exactly OpenAI's ``POST {api_base}/chat/completions``.
OPENAI_WIRE_PROVIDERS = frozenset({"openai", "hosted_vllm", "custom_openai"})

DEFAULTS: dict[str, Any] = {
    "max_tokens": 1024,
    "timeout_s": 120.0,
    "max_retries": 6,
    "retry_backoff_s": 1.0,
    "concurrency": 16,
    "transport": "auto",
    "drop_params": False,
    "preflight": True,
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
            "description": "Extra HTTP headers sent with every request. A credential header's value is a "
                           "secret reference (`${env:NAME}`), never written inline.",
        },
        "drop_params": {
            "type": "boolean",
            "description": "Drop sampling parameters the model does not support instead of failing "
                           "(litellm's drop_params). Default: false.",
        },
        "preflight": {
            "type": "boolean",
            "description": "Before a step's requests go to a self-hosted server (an `api_base` with "
                           "`openai/`, `hosted_vllm/` or `custom_openai/`), one `GET {api_base}/models`: a "
                           "server that cannot be reached fails the step at once, and a model the server "
                           "does not list is tried with one request before the rest. Default: true.",
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


@dataclass(frozen=True)
class Settings:
    """What one run reads from a model's options, defaults filled in and the key resolved."""

    model: str
    api_base: str | None
    api_key: str | None = field(repr=False)
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
    # Every secret value these settings hold, redacted from messages. Neither it nor the key is in repr().
    secrets: tuple[str, ...] = field(default=(), repr=False)
    preflight: bool = True               # GET {api_base}/models before a batch (see preflight.py)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Settings":
        o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
        if "model" not in o:
            raise ValueError("litellm backend: options need a `model`")
        api_key = o.get("api_key")
        api_key_env = o.get("_api_key_env")
        ref = env_ref_name(api_key)
        if ref is not None:
            # The caller did not resolve the reference; resolve it here rather than send it as a key.
            api_key_env = api_key_env or ref
            api_key = os.environ.get(ref)
        # The key, and whatever else the caller resolved from a reference (an Authorization header).
        secrets = tuple(resolved_secrets(options)) + ((api_key,) if isinstance(api_key, str) and api_key else ())
        defaults = {k: o[k] for k in ("temperature", "top_p", "max_tokens") if k in o}
        return cls(
            model=str(o["model"]), api_base=o.get("api_base"), api_key=api_key, api_key_env=api_key_env,
            defaults=defaults, timeout_s=float(o["timeout_s"]), max_retries=int(o["max_retries"]),
            retry_backoff_s=float(o["retry_backoff_s"]), concurrency=max(1, int(o["concurrency"])),
            rpm=o.get("rpm"), tpm=o.get("tpm"), extra_headers=dict(o.get("extra_headers") or {}),
            drop_params=bool(o["drop_params"]), transport=str(o["transport"]), secrets=secrets,
            preflight=bool(o["preflight"]),
        )


    def replace(self, **changes: Any) -> "Settings":
        from dataclasses import replace

        return replace(self, **changes)


def check_options(options: Mapping[str, Any]) -> list:
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
                # The direct transport posts to api_base + "/chat/completions".
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
