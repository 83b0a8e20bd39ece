"""Secrets are references (``${env:NAME}``), resolved only when a backend runs.

Plans, fingerprints, caches, manifests and error messages only ever hold the reference.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from specdsl.errors import RunError

REF = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")


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
    m = REF.match(value) if isinstance(value, str) else None
    if not m:
        return value
    name = m.group(1)
    if name not in os.environ or not os.environ[name]:
        raise RunError(f"model '{model}': environment variable {name} is not set (needed for `{key}`)",
                       hint=f"export {name}=... before running; the spec only names it")
    out[f"_{key}_env"] = name
    return os.environ[name]


def redact(text: str, options: Mapping[str, Any]) -> str:
    """Remove resolved secret values from a message that may quote them (a provider's error, say)."""
    for key, value in options.items():
        if key.startswith("_") and key.endswith("_env"):
            secret: Any = options
            for part in key[1:-4].split(".", 1):
                secret = secret.get(part) if isinstance(secret, Mapping) else None
            if isinstance(secret, str) and len(secret) >= 4:
                text = text.replace(secret, f"${{env:{value}}}")
    return text
