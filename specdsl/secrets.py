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

A message that is cut to a length limit is redacted first and cut after, so a secret straddling the cut
is never printed in part.

Only the standard library is imported at module level: :mod:`specdsl.errors` imports this module.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Iterable, Mapping

# A reference is a whole value: ``${env:NAME}``, NAME a shell variable name. The string form is what
# JSON Schema ``pattern`` takes (option schemas use it for ``api_key``); the spec schema recognises
# secret options by exactly this pattern.
ENV_REF_PATTERN = r"^\$\{env:[A-Za-z_][A-Za-z0-9_]*\}$"
ENV_REF = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")
# What starts a reference, and anything shaped like one, valid name or not: a YAML excerpt is scanned
# with these so that a malformed reference is still taken as one value (and then redacted whole).
_ENV_REF_START = r"\$\{env:"
_ENV_REF_LIKE = r"\$\{env:[A-Za-z0-9_]*\}"

# Shorter values are not redacted by value: replacing every "abc" in a message would garble it, and a
# secret that short protects nothing anyway.
MIN_SECRET_LENGTH = 4


def env_ref_name(value: Any) -> str | None:
    """The variable a ``${env:NAME}`` reference names, or None when ``value`` is not a reference."""
    m = ENV_REF.match(value) if isinstance(value, str) else None
    return m.group(1) if m else None


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
        # Imported here: errors.py imports this module for redaction, and only this failure needs it.
        from specdsl.errors import RunError

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


def redact(text: str, options: Mapping[str, Any]) -> str:
    """Remove resolved secret values from a message that may quote them (a provider's error, say); each
    becomes the reference it was resolved from."""
    return redact_values(text, resolved_secrets(options))


# --------------------------------------------------------------------------------------------------
# Redaction by shape (a spec's messages, before anything is resolved)
# --------------------------------------------------------------------------------------------------

# Keys whose values are secrets (``api_key``, ``openai_api_key``, ``hf_token``, ``access_token``,
# ``client_secret``, ``password``, an ``Authorization`` or ``X-Api-Key`` header) and the shapes of well-known
# provider keys, or of a password written into a URL. Keys that merely end in
# "token" (``eos_token``, ``max_new_token``) are not secrets. ``${env:NAME}`` values are references.
_SECRET_NAMES = (r"(?:[A-Za-z0-9]+[_-])*(?:api[_-]?key|access[_-]?token|auth[_-]?token|secret[_-]?key|"
                 r"client[_-]?secret|password|passwd|authorization)|(?:hf|github|gh|bearer|api)[_-]token|token|"
                 r"secret|cookie")
SECRET_KEY = re.compile(rf"(?i)^(?:{_SECRET_NAMES})$")
SECRET_VALUE = re.compile(r"\b(?:sk-(?=[A-Za-z_-]*[0-9])[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
                          r"github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|xox[abpr]-[A-Za-z0-9-]{10,}|"
                          r"AIza[0-9A-Za-z_-]{30,})"
                          # a password inside a URL (http://user:password@host), unless it is a reference
                          rf"|(?<=[A-Za-z0-9+.-]://)[^/\s:@]+:(?!{_ENV_REF_START})[^/\s@]+(?=@)")
# `key: value` inside a line (block or flow style); the value runs to a comma, brace or comment. Compiled
# on first use (only printing an error needs it; compiling it costs more than the rest of this module).
_SECRET_ASSIGN = r"""(?ix)
    (?<![A-Za-z0-9_-])(?P<key>{names})
    (?P<sep>["']?\s*:\s*)
    (?P<value>{env_ref_like}|"[^"]*"|'[^']*'|[^,}}\]\s#][^,}}\]#]*)"""


@functools.lru_cache(maxsize=1)
def _secret_assign() -> re.Pattern:
    return re.compile(_SECRET_ASSIGN.format(names=_SECRET_NAMES, env_ref_like=_ENV_REF_LIKE))


def is_secret_key(key: object) -> bool:
    return isinstance(key, str) and bool(SECRET_KEY.match(key))


def looks_like_secret(value: object) -> bool:
    """A string value that is the shape of a well-known provider key (sk-..., hf_..., ghp_...)."""
    return isinstance(value, str) and bool(SECRET_VALUE.search(value))


def redact_secrets(text: str) -> str:
    """``text`` with inline secret values (secret-named keys, provider key shapes) replaced by ``***``."""

    def assign(m: re.Match) -> str:
        value = m.group("value").strip().strip("'\"")
        if ENV_REF.match(value) or not value:
            return m.group(0)
        return f"{m.group('key')}{m.group('sep')}***"

    return SECRET_VALUE.sub("***", _secret_assign().sub(assign, text))
