"""Connecting to Ray once per process (an existing connection, ``RAY_ADDRESS``, or a private local
instance) and reading the executor's settings from the environment."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from specdsl.errors import RunError

ENV_ROWS_PER_TASK = "SPECDSL_RAY_ROWS_PER_TASK"
ENV_REQUESTS_PER_TASK = "SPECDSL_RAY_REQUESTS_PER_TASK"
ENV_TASK_CPUS = "SPECDSL_RAY_TASK_CPUS"
ENV_TASK_GPUS = "SPECDSL_RAY_TASK_GPUS"
ENV_MAX_IN_FLIGHT = "SPECDSL_RAY_MAX_IN_FLIGHT"
ENV_NUM_CPUS = "SPECDSL_RAY_NUM_CPUS"

INSTALL_HINT = "pip install 'specdsl[ray]'"
NODE_HINT = "every Ray node needs the same specdsl and the plugins the spec uses installed"

_INIT_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RunError(f"the ray executor needs Ray, which is not importable here ({exc})",
                       hint=INSTALL_HINT) from None
    return ray


def ensure_ray(num_cpus: int | None = None) -> Any:
    """Connect to Ray once per process and return the ``ray`` module.

    Reuses an existing connection; else connects to ``RAY_ADDRESS`` when set; else starts a local
    instance with ``num_cpus`` CPUs (default ``SPECDSL_RAY_NUM_CPUS``, else min(cpu_count, 8)).
    """
    ray = _import_ray()
    with _INIT_LOCK:
        if ray.is_initialized():
            return ray
        address = os.environ.get("RAY_ADDRESS", "").strip() or None
        quiet = {"ignore_reinit_error": True, "log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                cpus = num_cpus or env_number(ENV_NUM_CPUS, int) or min(os.cpu_count() or 1, 8)
                # "local": never attach silently to some other `ray start` cluster on this machine
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
        except RunError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray raises many types (ConnectionError, ValueError, ...)
            where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray instance"
            raise RunError(f"cannot start or reach {where}: {type(exc).__name__}: {first_line(exc)}",
                           hint="check `ray status`; unset RAY_ADDRESS to run on a private local instance"
                           if address else "see /tmp/ray/session_latest/logs") from None
    return ray


def env_number(name: str, kind: type) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise RunError(f"{name}={raw!r} is not a {'whole ' if kind is int else ''}number") from None
    if value < 0 or (kind is int and value == 0):
        raise RunError(f"{name}={raw!r} must be positive")
    return value


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
