"""The content-addressed run store.

Layout (default ``.specdsl/`` beside the spec)::

    nodes/<fp[:2]>/<fingerprint>/data.parquet   a node's output table
    nodes/<fp[:2]>/<fingerprint>/meta.json      node id, op, rows, columns, tokens, cost, duration
    nodes/<fp[:2]>/<fingerprint>/...            artifacts (a trained model, plots)
    journal.sqlite                              every completed generation request (resume, dedup)
    runs/<run-id>/run.json                      one manifest per run; run.json at the top is the latest

A node directory appears only complete: it is written under ``tmp/`` and renamed into place, so an
interrupted run never leaves a table a later run could mistake for finished work.

A node counts as stored only when its meta parses and its table is there (:meth:`Store.has`); a run also
reads the table's footer before it trusts a cached node (:meth:`Store.verify`). A folder that fails either
check (a truncated ``data.parquet``, garbage or a deleted ``meta.json``) is moved to ``quarantine/`` and
the node is computed again, never thrown away in favour of the broken copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from specdsl.contract.ops import Batch, decode_json_columns
from specdsl.errors import RunError
from specdsl.jsontext import json_text

Rows = list[dict[str, Any]]
DATA = "data.parquet"
META = "meta.json"


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        try:
            (self.root / "nodes").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunError(f"the run store {self.root} is not a folder (a file of that name is in the way)",
                           hint="move the file away, or pass --store with another folder") from None
        except OSError as exc:
            raise RunError(f"cannot create the run store {self.root}: {exc.strerror or exc}",
                           hint="pass --store with a folder you can write") from None

    # -- paths ----------------------------------------------------------------------------------------

    def node_dir(self, fingerprint: str) -> Path:
        return self.root / "nodes" / fingerprint[:2] / fingerprint

    @property
    def journal_path(self) -> Path:
        return self.root / "journal.sqlite"

    def has(self, fingerprint: str) -> bool:
        """The node's folder holds a meta that parses and a table (cheap: no table is read)."""
        d = self.node_dir(fingerprint)
        return (d / DATA).is_file() and self._read_meta(d) is not None

    def meta(self, fingerprint: str) -> dict[str, Any]:
        meta = self._read_meta(self.node_dir(fingerprint))
        if meta is None:
            raise RunError(f"the stored node {fingerprint[:12]} has no readable meta.json",
                           hint="run again: the node is recomputed")
        return meta

    @staticmethod
    def _read_meta(d: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((d / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def verify(self, fingerprint: str) -> bool:
        """The stored table's footer reads and holds the rows the meta says (what a cache hit trusts)."""
        meta = self._read_meta(self.node_dir(fingerprint))
        if meta is None:
            return False
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return True  # nothing to read it with (a fully cached run needs no pyarrow): the meta must do
        try:
            rows = pq.read_metadata(self.node_dir(fingerprint) / DATA).num_rows
        except Exception:  # truncated, garbage, missing: all mean "not stored"
            return False
        return meta.get("rows") is None or rows == meta.get("rows")

    def quarantine(self, fingerprint: str) -> Path | None:
        """Move a node's folder that cannot be trusted out of the way (kept for a post-mortem)."""
        d = self.node_dir(fingerprint)
        if not d.exists():
            return None
        target = self.root / "quarantine" / f"{fingerprint}-{int(time.time() * 1000)}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(d, target)
        except OSError:
            shutil.rmtree(d, ignore_errors=True)
            return None
        return target

    # -- writing --------------------------------------------------------------------------------------

    def staging(self, fingerprint: str) -> Path:
        """A fresh private folder for a node being computed (artifacts go here before the commit). Its name
        carries the owner's pid, so a later run can tell a killed run's leftovers from live work."""
        return Path(tempfile.mkdtemp(prefix=f"{fingerprint[:12]}-p{os.getpid()}-", dir=self.root / "tmp"))

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
            if final.exists():
                if self.verify(fingerprint):
                    # A concurrent run finished the same node first: identical by construction.
                    shutil.rmtree(staging, ignore_errors=True)
                    return final
                self.quarantine(fingerprint)  # a broken copy never wins over the new output
            os.replace(staging, final)
            return final
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise RunError(f"cannot write to the run store {self.root}: {exc.strerror or exc}",
                           hint="free some disk space; every finished node and request is kept") from None

    # -- reading --------------------------------------------------------------------------------------

    def load(self, fingerprint: str) -> Rows:
        d = self.node_dir(fingerprint)
        meta = self.meta(fingerprint)
        try:
            return read_table(d / DATA, meta.get("json_columns", []))
        except Exception as exc:
            moved = self.quarantine(fingerprint)
            raise RunError(f"the stored table {d / DATA} cannot be read ({type(exc).__name__}: "
                           f"{str(exc)[:200]})" + (f"; moved to {moved}" if moved else ""),
                           hint="run again: the node is recomputed") from None

    def iter_batches(self, fingerprint: str, size: int | None = None) -> Iterator[Rows]:
        """A node's rows a batch at a time (peak memory: one batch, not the table)."""
        d = self.node_dir(fingerprint)
        meta = self.meta(fingerprint)
        yield from read_batches(d / DATA, meta.get("json_columns", []), size)

    def iter_arrow_batches(self, fingerprint: str, size: int | None = None) -> Iterator[Batch]:
        """A node's table a batch at a time as Arrow (:class:`Batch`, JSON-text columns kept as text)."""
        d = self.node_dir(fingerprint)
        meta = self.meta(fingerprint)
        yield from read_arrow_batches(d / DATA, meta.get("json_columns", []), size)

    def clean_tmp(self, older_than_s: float = 0) -> list[Path]:
        """Remove staging folders no live process owns: the owner's pid (in the name) is gone, or, for a
        folder without one, it is older than ``older_than_s``. Returns what was removed."""
        now = time.time()
        removed = []
        for p in (self.root / "tmp").iterdir():
            owner = staging_owner(p.name)
            try:
                stale = (not pid_alive(owner)) if owner is not None else now - p.stat().st_mtime >= older_than_s
            except OSError:
                continue  # removed meanwhile
            if stale:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    # -- one writer at a time ----------------------------------------------------------------------------

    def lock(self) -> "RunLock":
        """The store's run lock (see :class:`RunLock`); take it with ``with store.lock(): ...``."""
        return RunLock(self.root / LOCK)


LOCK = "run.lock"


def staging_owner(name: str) -> int | None:
    """The pid in a staging folder's name (``<fp12>-p<pid>-<random>``), None for an older name."""
    parts = name.split("-")
    if len(parts) >= 3 and parts[1].startswith("p") and parts[1][1:].isdigit():
        return int(parts[1][1:])
    return None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return False
    return True


class RunLock:
    """An exclusive lock on a run store, held for a whole run: two runs of one store at once would send the
    same requests twice and write the same nodes twice. The second run refuses at once with the first one's
    pid (waiting could hang a CI job behind a stuck run). The OS drops the lock when its process dies, so a
    killed run never leaves the store locked. On a platform without ``fcntl`` the lock is advisory only."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs are not guarded there
            return self
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            store = self.path.parent
            raise RunError(f"another run is using the run store {store} ({holder})",
                           hint="wait for it to finish (it keeps every answer it gets), or give this run "
                                "its own store with --store") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            import fcntl

            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def write_table(path: Path, rows: Rows) -> list[str]:
    """Rows -> Parquet. Columns Arrow cannot type uniformly (chat content that is sometimes a string,
    sometimes a list of parts) are stored as JSON text and named in the returned list."""
    import pyarrow.parquet as pq

    table, json_columns = rows_to_table(rows)
    pq.write_table(table, path)
    return json_columns


def rows_to_table(rows: Rows) -> tuple[Any, list[str]]:
    """The Arrow table :func:`write_table` stores for ``rows``, and its JSON-text columns: columns in order
    of first appearance (a row without one is null there); a column of nested values (dicts, lists of
    dicts or lists), or of values Arrow cannot type uniformly, as JSON text."""
    import pyarrow as pa

    from operator import itemgetter

    # The distinct key orders first (rows of one table mostly share one): the columns in order of first
    # appearance, and which columns every row has (read with a C-level getter, not a call per row).
    shapes = list(dict.fromkeys(map(tuple, rows)))
    names = list(dict.fromkeys(k for shape in shapes for k in shape))
    everywhere = set(shapes[0]).intersection(*shapes[1:]) if shapes else set()
    arrays, json_columns = [], []
    for name in names:
        values = list(map(itemgetter(name), rows)) if name in everywhere else [row.get(name) for row in rows]
        array, as_json = column_as_stored(values)
        arrays.append(array)
        if as_json:
            json_columns.append(name)
    return (pa.Table.from_arrays(arrays, names=names) if names else pa.table({})), json_columns




def column_as_stored(values: list[Any]) -> tuple[Any, bool]:
    """One column's values as the store keeps them: (Arrow array, False), or (JSON text, True) for nested
    values or values Arrow cannot type uniformly."""
    import pyarrow as pa

    from specdsl.execute.columns import plain_array, string_array

    # A plain column is built from its buffers: pa.array would import pandas (see columns.py).
    array = plain_array(values)
    if array is not None:
        return array, False
    first = next((v for v in values if v is not None), None)
    if _nested(first):  # a column with a nested value is JSON text whatever the rest (and pa.array: pandas)
        return string_array([None if v is None else json_text(v) for v in values]), True
    try:
        array = pa.array(values)
        if _nested_type(array.type):
            raise TypeError("nested")  # structs would gain null keys on the way back: keep JSON exact
        return array, False
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError):
        return string_array([None if v is None else json_text(v) for v in values]), True


def _nested_type(t: Any) -> bool:
    """The Arrow type inferred for a column holds a dict, or a list holding a dict or a list: what the rows'
    values are exactly when one is ``_nested`` (type inference is C; the check per value was Python)."""
    import pyarrow as pa

    if pa.types.is_struct(t) or pa.types.is_map(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = t.value_type
        return pa.types.is_struct(inner) or pa.types.is_map(inner) or pa.types.is_list(inner) \
            or pa.types.is_large_list(inner) or pa.types.is_fixed_size_list(inner)
    return False


def _nested(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(x, (dict, list)) for x in value))


def read_table(path: Path, json_columns: Iterable[str] = ()) -> Rows:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:  # not pq.read_table: that imports pyarrow.dataset and pandas
        table = parquet.read()
    return decode_json_columns(table.to_pylist(), json_columns)


def read_batches(path: Path, json_columns: Iterable[str] = (), size: int | None = None) -> Iterator[Rows]:
    """A stored table's rows, ``size`` at a time (default 8192), JSON-text columns decoded."""
    for batch in read_arrow_batches(path, json_columns, size):
        yield batch.rows()


def read_arrow_batches(path: Path, json_columns: Iterable[str] = (), size: int | None = None) -> Iterator[Batch]:
    """A stored table ``size`` rows at a time (default 8192) as Arrow :class:`Batch` es, JSON text kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    json_columns = tuple(json_columns)
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=size or 8192):
            yield Batch.from_arrow(pa.Table.from_batches([batch]), [c for c in json_columns
                                                                     if c in batch.schema.names])
