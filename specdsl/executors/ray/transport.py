"""What crosses the process boundary between the driver and the Ray workers: the backend (by value, or
by name when it cannot be pickled) and an exception raised in a worker, captured there and raised again
in the driver as itself (or as a RunError that says what it was), never as a Ray traceback."""

from __future__ import annotations

import importlib
import os
import pickle
import traceback
from dataclasses import dataclass
from typing import Any, Mapping

from specdsl.errors import RunError
from specdsl.executors.ray.connect import NODE_HINT, first_line


@dataclass(frozen=True)
class BackendByName:
    """A backend that could not be pickled: looked up again in the worker's plugin registry."""

    name: str

    def resolve(self) -> Any:
        # This runs in a Ray worker, where no caller is left to hand the backend over: the only place it
        # can come from is the plugins installed on that node. Found by module name at run time (as entry
        # points are) because specdsl.plugins is the layer that registers this executor, not one below it.
        registry = importlib.import_module("specdsl.plugins").default_registry()
        backend = registry.backends.get(self.name)
        if backend is None:
            raise RunError(f"generation backend '{self.name}' is not installed on this Ray worker", hint=NODE_HINT)
        return backend


def backend_payload(ray: Any, backend: Any) -> Any:
    """The backend as an object-store ref, or its name when it cannot be pickled."""
    try:
        return ray.put(backend)
    except Exception:  # noqa: BLE001 - e.g. it holds a lock or a client
        return BackendByName(backend.name)


def capture_error(exc: BaseException) -> dict[str, Any]:
    """What the driver needs to raise ``exc`` again as itself (or a RunError that says what it was)."""
    import socket

    info: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": _tail("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))),
        "where": f"Ray worker pid {os.getpid()} on {socket.gethostname()}",
    }
    if isinstance(exc, RunError):
        info["run_error"] = {"message": exc.message, "node": exc.node, "hint": exc.hint, "pos": exc.pos}
        return info
    try:
        blob = pickle.dumps(exc)
        back = pickle.loads(blob)
        if type(back) is type(exc) and str(back) == str(exc):
            info["pickled"] = blob
    except Exception:  # noqa: BLE001 - not every exception survives pickling
        pass
    return info


def _tail(text: str, lines: int = 25) -> str:
    kept = text.rstrip().splitlines()
    return "\n".join((["  ..."] if len(kept) > lines else []) + kept[-lines:])


def raise_again(info: Mapping[str, Any]) -> None:
    if "run_error" in info:
        e = info["run_error"]
        raise RunError(e["message"], node=e["node"], hint=e["hint"], pos=e["pos"]) from None
    if "pickled" in info:
        exc = pickle.loads(info["pickled"])
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise RunError(f"a Ray task was interrupted ({info['type']})")
        exc.add_note(f"(raised in a Ray task, {info['where']}; its traceback:)\n{info['traceback'].rstrip()}")
        raise exc
    raise RunError(f"{info['type']}: {info['message']}",
                   hint=f"raised in a Ray task, {info['where']}; its traceback:\n{info['traceback'].rstrip()}")


def describe_ray_error(exc: BaseException) -> str:
    """A one-line account of a Ray-level failure (no Ray traceback)."""
    try:
        from ray import exceptions as rex
    except ImportError:  # pragma: no cover
        return f"{type(exc).__name__}: {first_line(exc)}"
    if isinstance(exc, rex.OutOfMemoryError):
        return "Ray killed the worker because the node ran out of memory"
    if isinstance(exc, rex.TaskCancelledError):
        return "the task was cancelled"
    if isinstance(exc, rex.WorkerCrashedError):
        return "the worker process exited unexpectedly (killed, crashed or out of memory)"
    if isinstance(exc, rex.NodeDiedError):
        return "the Ray node running it died"
    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        if cause is not None:
            return f"{type(cause).__name__}: {first_line(cause)}"
    return f"{type(exc).__name__}: {first_line(exc)}"
