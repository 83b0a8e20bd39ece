"""The request journal: every completed generation request, keyed by its content hash.

A run writes each result here the moment the provider answers, so a crashed, killed or interrupted run
resumes without re-issuing (and re-paying for) a single completed request. The journal is an SQLite
database in WAL mode:

* ``put`` commits before it returns. In WAL mode a commit is a ``write()`` into the ``-wal`` file, so
  the row survives the process being SIGKILLed the next instant (the OS has it). ``sync="full"`` also
  fsyncs every commit, surviving power loss at roughly a millisecond or more per result on real disks.
* Successes are append-only and first-wins (``INSERT OR IGNORE``): an answer, once journaled, is the
  answer. Failures go to a separate log; they never count as done, so a resumed run retries them.
* One connection guarded by a lock makes an instance thread-safe; WAL plus a busy timeout lets several
  processes read and write the same file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from specdsl.contract.hookspecs import GenResult
from specdsl.errors import RunError

SCHEMA_VERSION = 1
_CHUNK = 500  # keys per SELECT ... IN (...): well under SQLite's variable limit on every build

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key           TEXT PRIMARY KEY,
    text          TEXT NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost          REAL NOT NULL,
    latency_s     REAL NOT NULL,
    created_at    REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT NOT NULL,
    error       TEXT NOT NULL,
    latency_s   REAL NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS failures_key ON failures(key);
"""


class RequestJournal:
    """Append-only store of generation results; see the module docstring for the durability contract.

    ``sync``: ``"normal"`` (default) survives a killed process; ``"full"`` also survives power loss.
    """

    def __init__(self, path: str | os.PathLike[str], *, sync: str = "normal", timeout_s: float = 60.0):
        if sync not in ("normal", "full"):
            raise ValueError("sync must be 'normal' or 'full'")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing is left in an implicit
        # transaction between calls. check_same_thread=False: the lock makes sharing safe.
        try:
            self._db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self._open(sync, timeout_s)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise RunError(f"the request journal {self.path} stayed locked for {timeout_s:g} s",
                               hint="another process holds it: wait for that run to finish") from None
            # Garbage, a truncated file or a foreign database: never repair or replace it here (a journal
            # that still reads in part may hold answers already paid for); the user moves it aside.
            try:
                self._db.close()
            except Exception:  # noqa: BLE001
                pass
            raise RunError(f"the request journal {self.path} cannot be read ({exc})",
                           hint=f"move it aside (mv {self.path} {self.path}.broken) and run again: a new "
                                "journal is started and requests not found in it are sent again") from None

    def _open(self, sync: str, timeout_s: float) -> None:
        with self._lock:
            self._db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"{self.path}: cannot enable WAL journaling (got {mode!r})")
            self._db.execute(f"PRAGMA synchronous={sync.upper()}")
            # One IMMEDIATE transaction: two processes opening a new journal at once cannot interleave
            # the schema creation and the version stamp.
            self._db.execute("BEGIN IMMEDIATE")
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                self._db.execute(stmt)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                self._db.execute("ROLLBACK")
                raise RuntimeError(f"{self.path} was written by a newer specdsl (journal v{version})")
            self._db.execute("COMMIT")

    # -- writing ----------------------------------------------------------------------------------

    def put(self, result: GenResult) -> None:
        """Record one result; durable (against a killed process) when this returns."""
        self.put_many((result,))

    def put_many(self, results: Iterable[GenResult]) -> None:
        """Record several results in one transaction (one commit for all)."""
        now = time.time()
        ok_rows, fail_rows = [], []
        for r in results:
            if r.ok:
                if r.text is None:
                    raise ValueError(f"result {r.key}: a success needs text")
                ok_rows.append((r.key, r.text, int(r.input_tokens), int(r.output_tokens), float(r.cost),
                                float(r.latency_s), now))
            else:
                fail_rows.append((r.key, str(r.error), float(r.latency_s), now))
        if not ok_rows and not fail_rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if ok_rows:
                    self._db.executemany(
                        "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?)", ok_rows)
                if fail_rows:
                    self._db.executemany(
                        "INSERT INTO failures (key, error, latency_s, created_at) VALUES (?, ?, ?, ?)",
                        fail_rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- reading ----------------------------------------------------------------------------------

    def get_many(self, keys: Iterable[str]) -> dict[str, GenResult]:
        """The journaled successes among ``keys`` (failures never count as done)."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, GenResult] = {}
        with self._lock:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute(
                        "SELECT key, text, input_tokens, output_tokens, cost, latency_s FROM results "
                        f"WHERE key IN ({marks})", chunk):
                    out[row[0]] = GenResult(key=row[0], text=row[1], input_tokens=row[2],
                                            output_tokens=row[3], cost=row[4], latency_s=row[5])
        return out

    def get(self, key: str) -> GenResult | None:
        return self.get_many((key,)).get(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __len__(self) -> int:
        """Number of successful results."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def keys(self) -> Iterator[str]:
        with self._lock:
            rows = self._db.execute("SELECT key FROM results").fetchall()
        return iter(r[0] for r in rows)

    def failures(self) -> dict[str, GenResult]:
        """The latest failure of each key that has not succeeded since."""
        with self._lock:
            rows = self._db.execute(
                "SELECT f.key, f.error, f.latency_s FROM failures f "
                "JOIN (SELECT key, MAX(id) AS id FROM failures GROUP BY key) last ON f.id = last.id "
                "WHERE f.key NOT IN (SELECT key FROM results) ORDER BY f.id").fetchall()
        return {k: GenResult(key=k, error=e, latency_s=lat) for k, e, lat in rows}

    def failure_count(self) -> int:
        """Every failed attempt ever journaled, including keys that later succeeded."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM failures").fetchone()[0]

    def totals(self) -> dict[str, float]:
        """Tokens and cost of every journaled success (what the work so far has cost)."""
        with self._lock:
            n, i, o, c = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
                "COALESCE(SUM(cost), 0) FROM results").fetchone()
        return {"results": n, "input_tokens": i, "output_tokens": o, "cost": c}

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                try:
                    self._db.execute("PRAGMA optimize")
                finally:
                    self._db.close()
                    self._db = None  # type: ignore[assignment]

    def __enter__(self) -> "RequestJournal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RequestJournal({str(self.path)!r})"
