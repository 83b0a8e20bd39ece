"""The local executor: everything runs in this process (generation backends bring their own concurrency)."""

from __future__ import annotations

from typing import Any, Callable


class LocalExecutor:
    name = "local"
    in_process = True  # row-parallel ops run as themselves, with the run's services, not in chunks

    def map_rows(self, fn: Callable[[list[dict]], list[dict]], rows: list[dict]) -> list[dict]:
        return fn(rows)

    def wrap_backend(self, backend: Any) -> Any:
        return backend
