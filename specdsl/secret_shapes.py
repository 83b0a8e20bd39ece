"""What a secret looks like: the ``${env:NAME}`` reference form, secret-named keys and well-known
provider key shapes, and redaction by shape (a spec's messages, before anything is resolved).

A leaf module (standard library only): :mod:`specdsl.errors` redacts every message with it, and
:mod:`specdsl.secrets` (resolving references, redaction by value) builds on it.
"""

from __future__ import annotations

import functools
import re
from typing import Any

# A reference is a whole value: ``${env:NAME}``, NAME a shell variable name. The string form is what
# JSON Schema ``pattern`` takes (option schemas use it for ``api_key``); the spec schema recognises
# secret options by exactly this pattern.
ENV_REF_PATTERN = r"^\$\{env:[A-Za-z_][A-Za-z0-9_]*\}$"
ENV_REF = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")
# What starts a reference, and anything shaped like one, valid name or not: a YAML excerpt is scanned
# with these so that a malformed reference is still taken as one value (and then redacted whole).
_ENV_REF_START = r"\$\{env:"
_ENV_REF_LIKE = r"\$\{env:[A-Za-z0-9_]*\}"


def env_ref_name(value: Any) -> str | None:
    """The variable a ``${env:NAME}`` reference names, or None when ``value`` is not a reference."""
    m = ENV_REF.match(value) if isinstance(value, str) else None
    return m.group(1) if m else None


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
# `key: value` inside a line (block or flow style); the value runs to a comma, brace or comment. A name
# that ends a path (`cannot read '/etc/passwd': ...`) or starts a file position (`passwd:3: not valid
# JSON`) is a file, not a key: what follows it is a message, left whole. Compiled on first use (only
# printing an error needs it; compiling it costs more than the rest of this module).
_SECRET_ASSIGN = r"""(?ix)
    (?<![A-Za-z0-9_/\\-])(?P<key>{names})(?!:\d+(?::\d+)?:)
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
