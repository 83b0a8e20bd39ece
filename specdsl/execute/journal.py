"""The request journal: every completed generation request, keyed by its content hash.

A run writes each result here the moment the provider answers, so a crashed, killed or interrupted run
resumes without re-issuing (and re-paying for) a single completed request. The journal is an SQLite
database in WAL mode:

* ``put`` commits before it returns. In WAL mode a commit is a ``write()`` into the ``-wal`` file, so
  the row survives the process being SIGKILLed the next instant (the OS has it). ``sync="full"`` also
  fsyncs every commit, surviving power loss at roughly a millisecond or more per result on real disks.
* Successes are append-only and first-wins (``INSERT OR IGNORE``): an answer, once journaled, is the
  answer. Failures go to a separate log; they never count as done, so a resumed run retries them.
* A success is first appended to ``incoming`` in arrival order, which touches only that table's last
  page; filing each answer under its key in ``results`` at once would touch a random page per answer
  (keys are hashes), which cost a busy run ~0.5 s of CPU per 20,000 answers on its request loop.
  ``incoming`` is filed into ``results`` in one transaction when a :class:`JournalWriter` closes, when
  the journal is opened (what a killed run left) and before any read, so readers see both. The view
  ``answers`` shows every answer journaled so far, filed or not, one per key (the first): what to query
  from outside (``sqlite3 .specdsl/journal.sqlite "select count(*) from answers"``) while a run is going.
* One connection guarded by a lock makes an instance thread-safe; WAL plus a busy timeout lets several
  processes read and write the same file.
* :class:`JournalWriter` groups the commits of a busy request loop: one ``BEGIN IMMEDIATE`` +
  ``COMMIT`` per ~10 ms of results instead of one per result, while a kill still loses at most the
  last ~20 ms of answers (and none while they arrive slowly).
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

SCHEMA_VERSION = 2  # 2: the `incoming` table (a v1 journal is upgraded in place when opened)
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
CREATE TABLE IF NOT EXISTS incoming (
    seq           INTEGER PRIMARY KEY,
    key           TEXT NOT NULL,
    text          TEXT NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost          REAL NOT NULL,
    latency_s     REAL NOT NULL,
    created_at    REAL NOT NULL
);
CREATE VIEW IF NOT EXISTS answers AS
    SELECT key, text, input_tokens, output_tokens, cost, latency_s, created_at FROM results
    UNION ALL
    SELECT key, text, input_tokens, output_tokens, cost, latency_s, created_at FROM incoming
    WHERE seq IN (SELECT MIN(seq) FROM incoming GROUP BY key) AND key NOT IN (SELECT key FROM results);
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
            # Checkpoint (copy the WAL back into the database, with an fsync) every ~16 MB of WAL rather
            # than SQLite's ~4 MB: answers have random keys, so each lands on its own page, and a busy run
            # otherwise stalls its request loop on a checkpoint every few hundred answers.
            self._db.execute("PRAGMA wal_autocheckpoint=4000")
            # One IMMEDIATE transaction: two processes opening a new journal at once cannot interleave
            # the schema creation and the version stamp.
            self._db.execute("BEGIN IMMEDIATE")
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                self._db.execute(stmt)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                self._db.execute("ROLLBACK")
                raise RuntimeError(f"{self.path} was written by a newer specdsl (journal v{version})")
            if version < SCHEMA_VERSION:  # new, or v1: the tables it lacked were created just above
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._file_incoming_in_transaction()  # the answers of a run killed before it filed them
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
                        "INSERT INTO incoming (key, text, input_tokens, output_tokens, cost, latency_s, "
                        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", ok_rows)
                if fail_rows:
                    self._db.executemany(
                        "INSERT INTO failures (key, error, latency_s, created_at) VALUES (?, ?, ?, ?)",
                        fail_rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def file_incoming(self) -> None:
        """File the answers appended to ``incoming`` under their keys in ``results`` (one transaction)."""
        with self._lock:
            self._file_incoming()

    def _file_incoming(self) -> None:  # with self._lock held, outside a transaction
        # A stale answer to this check only skips or repeats an empty filing: both harmless.
        if not self._db.execute("SELECT EXISTS (SELECT 1 FROM incoming)").fetchone()[0]:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._file_incoming_in_transaction()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _file_incoming_in_transaction(self) -> None:
        # In arrival order, so that the first answer to a key wins here as it does in `results`.
        self._db.execute("INSERT OR IGNORE INTO results SELECT key, text, input_tokens, output_tokens, cost, "
                         "latency_s, created_at FROM incoming ORDER BY seq")
        self._db.execute("DELETE FROM incoming")

    # -- reading (each files what is in ``incoming`` first) ---------------------------------------

    def get_many(self, keys: Iterable[str]) -> dict[str, GenResult]:
        """The journaled successes among ``keys`` (failures never count as done)."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, GenResult] = {}
        with self._lock:
            self._file_incoming()
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
            self._file_incoming()
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def keys(self) -> Iterator[str]:
        with self._lock:
            self._file_incoming()
            rows = self._db.execute("SELECT key FROM results").fetchall()
        return iter(r[0] for r in rows)

    def failures(self) -> dict[str, GenResult]:
        """The latest failure of each key that has not succeeded since."""
        with self._lock:
            self._file_incoming()
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
            self._file_incoming()
            n, i, o, c = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
                "COALESCE(SUM(cost), 0) FROM results").fetchone()
        return {"results": n, "input_tokens": i, "output_tokens": o, "cost": c}

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                try:
                    self._file_incoming()
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


class JournalWriter:
    """Commits results in small groups instead of one transaction each, losing at most milliseconds.

    ``put`` commits at once, on the calling thread, the results that follow a pause (the first ``burst``
    after ``interval_s`` without one: the answers of a few workers that finish together): results that
    arrive slowly are each durable when ``put`` returns, exactly as with one commit per result. Results
    that arrive faster gather in a buffer that is committed, on the calling thread, by the first ``put``
    that finds it ``interval_s`` old or ``max_batch`` long; a flusher thread commits a buffer that stopped
    growing (the last results before a lull) once no result has come for ``interval_s``. So a busy
    request loop pays one transaction per ``interval_s`` (20,000 results at 1,500 a second: ~1,300
    transactions, where a budget of immediate commits per interval paid ~4,000), and a kill loses at most
    the last ``2 * interval_s`` of results.

    Commits stay on the calling thread on purpose: a writer thread committing every result would
    trade SQLite's cost for the GIL changing hands per row (sqlite3 releases it around every step).
    ``flush`` commits the buffer now; ``close`` flushes and stops the flusher. A failed commit raises
    from the ``put``/``flush``/``close`` that ran it, or (the flusher's) from the next one; results of
    a failed group are not journaled (they are re-sent on the next run, never taken as done).
    """

    def __init__(self, journal: RequestJournal, *, interval_s: float = 0.01, burst: int = 4,
                 max_batch: int = 256):
        self.journal = journal
        self.interval_s = interval_s
        self.burst = burst
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[GenResult] = []
        self._oldest = 0.0           # when the oldest pending result arrived
        self._last_put = -1e9        # when the latest result arrived
        self._run = 0                # results since the last pause of interval_s
        self._error: BaseException | None = None
        self._closed = False
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_stale, name="specdsl-journal-flusher", daemon=True)
        self._flusher.start()

    def put(self, result: GenResult) -> None:
        """Record one result: committed now, or within about ``interval_s`` (see the class docstring)."""
        now = time.monotonic()
        with self._lock:
            self._raise_error()
            if self._closed:
                raise RuntimeError("the journal writer is closed")
            if not self._pending:
                self._oldest = now
            self._pending.append(result)
            self._run = 1 if now - self._last_put >= self.interval_s else self._run + 1
            self._last_put = now
            if self._run <= self.burst or len(self._pending) >= self.max_batch \
                    or now - self._oldest >= self.interval_s:
                self._commit()

    def flush(self) -> None:
        """Commit everything recorded so far; raise a failed commit's error."""
        with self._lock:
            self._commit()
            self._raise_error()

    def close(self) -> None:
        """Flush, then stop the flusher thread."""
        self._stop.set()
        self._flusher.join()
        with self._lock:
            self._closed = True
            self._commit()
            self._raise_error()
            self.journal.file_incoming()

    def _commit(self) -> None:  # with self._lock held
        if self._pending:
            batch, self._pending = self._pending, []
            self.journal.put_many(batch)

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _flush_stale(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                # Only after a lull: while results keep arriving, the next ``put`` commits the buffer once
                # it is ``interval_s`` old. A commit here, on a second thread, would pass the GIL back and
                # forth with the busy request loop on every row (sqlite3 releases it around each step).
                if self._pending and time.monotonic() - self._last_put >= self.interval_s:
                    try:
                        self._commit()
                    except BaseException as exc:  # noqa: BLE001 - handed to the thread that records results
                        self._error = self._error or exc

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
