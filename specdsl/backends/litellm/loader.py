"""Importing litellm: once per process, offline (its bundled cost map, no fetch) and quiet.

Importing litellm costs 3-4 s of CPU, so only code that runs generation calls :func:`import_litellm`.
"""

from __future__ import annotations

import logging
import os
import threading

_litellm_lock = threading.Lock()
_litellm_module = None


def import_litellm():
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
