"""Secrets are references (``${env:NAME}``), resolved only when a backend runs; this module is the one
home of what a reference looks like, how references are resolved, and how secrets are kept out of
messages.

Plans, fingerprints, caches, manifests and error messages only ever hold the reference. Two kinds of
redaction keep it so:

* by value (:func:`redact`, :func:`redact_values`): the values a run resolved are replaced wherever a
  message quotes them (a provider echoing a key in its error body, say);
* by shape (:func:`redact_secrets`): before a run, nothing is resolved yet, so a spec's error messages
  and source excerpts hide what *looks* secret: values of secret-named keys (``api_key: ...``) and
  well-known provider key shapes (``sk-...``, ``hf_...``).

Text from outside a run (a provider's error body, an exception's words) enters a message through one
function, :func:`excerpt`: every resolved secret redacted by value, anything shaped like a secret
redacted by shape, and only then cut to length, so a secret straddling the cut is never printed in part.
Every failed request's error is redacted once more by value (:func:`redact`) where the run journals it,
whatever backend produced it.

What a secret looks like, and redaction by shape, live in the leaf :mod:`specdsl.secret_shapes` (which
:mod:`specdsl.errors` uses); this module re-exports them.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from specdsl.errors import RunError
from specdsl.secret_shapes import (ENV_REF, ENV_REF_PATTERN, SECRET_KEY, SECRET_VALUE, env_ref_name,  # noqa: F401
                                   is_secret_key, looks_like_secret, redact_secrets)

# Shorter values are not redacted by value: replacing every "abc" in a message would garble it, and a
# secret that short protects nothing anyway.
MIN_SECRET_LENGTH = 4


# --------------------------------------------------------------------------------------------------
# Resolving references (when a backend runs)
# --------------------------------------------------------------------------------------------------


def resolve(options: Mapping[str, Any], *, model: str = "") -> dict[str, Any]:
    """Options with every ``${env:NAME}`` replaced by the variable's value.

    References are whole values, at the top level or inside a mapping option (``extra_headers:
    {Authorization: ${env:AUTH_HEADER}}``). For each resolved value the name of its variable is kept as
    ``_k_env`` (``_extra_headers.Authorization_env`` one level down) so a backend can say which variable
    held a rejected key without ever printing the key.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            inner: dict[str, Any] = {}
            for sub, sub_value in value.items():
                inner[sub] = _resolved(sub_value, f"{key}.{sub}", model, out)
            out[key] = inner
        else:
            out[key] = _resolved(value, key, model, out)
    return out


def _resolved(value: Any, key: str, model: str, out: dict[str, Any]) -> Any:
    name = env_ref_name(value)
    if name is None:
        return value
    if name not in os.environ or not os.environ[name]:
        raise RunError(f"model '{model}': environment variable {name} is not set (needed for `{key}`)",
                       hint=f"export {name}=... before running; the spec only names it")
    out[f"_{key}_env"] = name
    return os.environ[name]


def resolved_secrets(options: Mapping[str, Any]) -> dict[str, str]:
    """The secret values :func:`resolve` put into ``options``, each with the variable it came from."""
    found: dict[str, str] = {}
    for key, name in options.items():
        if isinstance(key, str) and key.startswith("_") and key.endswith("_env"):
            secret: Any = options
            for part in key[1:-4].split(".", 1):
                secret = secret.get(part) if isinstance(secret, Mapping) else None
            if isinstance(secret, str):
                found[secret] = str(name)
    return found


# --------------------------------------------------------------------------------------------------
# Redaction by value (a run's resolved secrets)
# --------------------------------------------------------------------------------------------------


def redact_values(text: str, secrets: Mapping[str, str] | Iterable[str | None], replacement: str = "***") -> str:
    """``text`` with every occurrence of each secret replaced.

    ``secrets`` is either values (each replaced by ``replacement``) or a mapping of value to variable
    name (each replaced by its reference, ``${env:NAME}``). Longer values go first, so a secret that
    contains another is replaced whole. Redact *before* cutting a message to length.
    """
    if isinstance(secrets, Mapping):
        pairs = [(value, f"${{env:{name}}}") for value, name in secrets.items()]
    else:
        pairs = [(value, replacement) for value in secrets]
    for value, shown in sorted(pairs, key=lambda p: -len(p[0] or "")):
        if isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH and value in text:
            text = text.replace(value, shown)
    return text


def excerpt(text: str, secrets: Mapping[str, str] | Iterable[str | None] = (), limit: int = 300) -> str:
    """``text`` as an error message may quote it: redacted, then cut to at most ``limit`` characters.

    The one way outside text (a provider's error body, a 200 that is not JSON, an exception's message)
    becomes part of a failure. ``secrets`` are the run's resolved values (see :func:`redact_values`);
    redaction by shape then catches what no option held (a provider echoing a key it read elsewhere,
    ``Authorization: Bearer ...`` in a proxy's debug page). Redacting before the cut is the point: cut
    first, a key straddling the limit would survive in part, where nothing can recognise it any more.
    """
    text = redact_secrets(redact_values(text, secrets))
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "\u2026"


def redact(text: str, options: Mapping[str, Any]) -> str:
    """Remove resolved secret values from a message that may quote them (a provider's error, say); each
    becomes the reference it was resolved from."""
    return redact_values(text, resolved_secrets(options))
