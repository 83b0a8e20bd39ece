"""The content-addressed run store.

Layout (default ``.specdsl/`` beside the spec)::

    nodes/<fp[:2]>/<fingerprint>/data.parquet   a node's output table
    nodes/<fp[:2]>/<fingerprint>/meta.json      node id, op, rows, columns, tokens, cost, duration
    nodes/<fp[:2]>/<fingerprint>/...            artifacts (a trained model, plots)
    journal.sqlite                              every completed generation request (resume, dedup)
    runs/<run-id>/run.json                      one manifest per run; run.json at the top is the latest

A node directory appears only complete: it is written under ``tmp/`` and renamed into place, so an
interrupted run never leaves a table a later run could mistake for finished work.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from specdsl.errors import RunError

Rows = list[dict[str, Any]]
DATA = "data.parquet"
META = "meta.json"


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "nodes").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    # -- paths ----------------------------------------------------------------------------------------

    def node_dir(self, fingerprint: str) -> Path:
        return self.root / "nodes" / fingerprint[:2] / fingerprint

    @property
    def journal_path(self) -> Path:
        return self.root / "journal.sqlite"

    def has(self, fingerprint: str) -> bool:
        return (self.node_dir(fingerprint) / META).exists()

    def meta(self, fingerprint: str) -> dict[str, Any]:
        return json.loads((self.node_dir(fingerprint) / META).read_text())

    # -- writing --------------------------------------------------------------------------------------

    def staging(self, fingerprint: str) -> Path:
        """A fresh private folder for a node being computed (artifacts go here before the commit)."""
        return Path(tempfile.mkdtemp(prefix=f"{fingerprint[:12]}-", dir=self.root / "tmp"))

    def commit(self, fingerprint: str, rows: Rows, meta: dict[str, Any], staging: Path) -> Path:
        """Write ``rows`` and ``meta`` into ``staging`` and rename it into place atomically."""
        try:
            json_columns = write_table(staging / DATA, rows)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise RunError(f"cannot write to the run store {self.root}: {exc.strerror or exc}",
                           hint="free some disk space; every finished node and request is kept") from None
        return self.commit_written(fingerprint, len(rows), json_columns, meta, staging)

    def commit_written(self, fingerprint: str, rows: int, json_columns: list[str], meta: dict[str, Any],
                       staging: Path) -> Path:
        """Commit a node whose table is already in ``staging`` (written batch by batch, see
        specdsl.execute.batches): add ``meta`` and rename the folder into place atomically."""
        try:
            meta = {**meta, "rows": rows, "json_columns": json_columns, "fingerprint": fingerprint,
                    "committed_at": time.time()}
            (staging / META).write_text(json.dumps(meta, indent=2, default=str))
            final = self.node_dir(fingerprint)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a concurrent run finished the same node first: identical by construction
                shutil.rmtree(staging, ignore_errors=True)
                return final
            os.replace(staging, final)
            return final
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise RunError(f"cannot write to the run store {self.root}: {exc.strerror or exc}",
                           hint="free some disk space; every finished node and request is kept") from None

    # -- reading --------------------------------------------------------------------------------------

    def load(self, fingerprint: str) -> Rows:
        d = self.node_dir(fingerprint)
        meta = json.loads((d / META).read_text())
        return read_table(d / DATA, meta.get("json_columns", []))

    def iter_batches(self, fingerprint: str, size: int | None = None) -> Iterator[Rows]:
        """A node's rows a batch at a time (peak memory: one batch, not the table)."""
        d = self.node_dir(fingerprint)
        meta = json.loads((d / META).read_text())
        yield from read_batches(d / DATA, meta.get("json_columns", []), size)

    def clean_tmp(self, older_than_s: float = 0) -> None:
        now = time.time()
        for p in (self.root / "tmp").iterdir():
            if now - p.stat().st_mtime >= older_than_s:
                shutil.rmtree(p, ignore_errors=True)


def write_table(path: Path, rows: Rows) -> list[str]:
    """Rows -> Parquet. Columns Arrow cannot type uniformly (chat content that is sometimes a string,
    sometimes a list of parts) are stored as JSON text and named in the returned list."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names: list[str] = []
    for row in rows:
        for k in row:
            if k not in names:
                names.append(k)
    arrays, json_columns = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            if any(_nested(v) for v in values):
                raise TypeError("nested")  # structs would gain null keys on the way back: keep JSON exact
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError):
            arrays.append(pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values],
                                   type=pa.string()))
            json_columns.append(name)
    table = pa.Table.from_arrays(arrays, names=names) if names else pa.table({})
    pq.write_table(table, path)
    return json_columns


def _nested(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(x, (dict, list)) for x in value))


def read_table(path: Path, json_columns: Iterable[str] = ()) -> Rows:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    json_columns = list(json_columns)
    if json_columns:
        for row in rows:
            for c in json_columns:
                if row.get(c) is not None:
                    row[c] = json.loads(row[c])
    return rows


def read_batches(path: Path, json_columns: Iterable[str] = (), size: int | None = None) -> Iterator[Rows]:
    """A stored table's rows, ``size`` at a time (default 8192), JSON-text columns decoded."""
    import pyarrow.parquet as pq

    json_columns = list(json_columns)
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=size or 8192):
            rows = batch.to_pylist()
            if json_columns:
                for row in rows:
                    for c in json_columns:
                        if row.get(c) is not None:
                            row[c] = json.loads(row[c])
            yield rows
