"""The request journal: durability (SIGKILL), failures kept apart, threads and processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from specdsl.execute.journal import RequestJournal
from specdsl.contract.hookspecs import GenResult
from tests.conftest import ROOT


def ok(i: int, text: str | None = None) -> GenResult:
    return GenResult(key=f"k{i}", text=text if text is not None else f"answer {i}", input_tokens=i,
                     output_tokens=2 * i, cost=0.001 * i, latency_s=0.5)


def test_roundtrip(tmp_path):
    with RequestJournal(tmp_path / "j.sqlite") as j:
        j.put(ok(1))
        j.put(ok(2, text=""))  # an empty answer is still an answer
        got = j.get_many(["k1", "k2", "k3", "k1"])
        assert set(got) == {"k1", "k2"}
        assert got["k1"] == ok(1) and got["k2"].text == ""
        assert len(j) == 2 and "k1" in j and "k3" not in j and j.get("k3") is None
        assert sorted(j.keys()) == ["k1", "k2"]
        assert j.totals() == {"results": 2, "input_tokens": 3, "output_tokens": 6,
                              "cost": pytest.approx(0.003)}
    with RequestJournal(tmp_path / "j.sqlite") as j:  # reopened: still there
        assert j.get("k1") == ok(1)


def test_first_answer_wins(tmp_path):
    with RequestJournal(tmp_path / "j.sqlite") as j:
        j.put(ok(1, "first"))
        j.put(ok(1, "second"))
        assert j.get("k1").text == "first" and len(j) == 1


def test_failures_are_kept_apart_and_never_count_as_done(tmp_path):
    with RequestJournal(tmp_path / "j.sqlite") as j:
        j.put(GenResult(key="k1", error="HTTP 500 (after 7 attempts)"))
        j.put(GenResult(key="k1", error="timed out after 60 s"))
        j.put(GenResult(key="k2", error="HTTP 400: bad"))
        assert j.get_many(["k1", "k2"]) == {} and len(j) == 0
        fails = j.failures()
        assert list(fails) == ["k1", "k2"]
        assert fails["k1"].error == "timed out after 60 s" and not fails["k1"].ok
        j.put(ok(1))  # a later run succeeded: no longer a failure, still in the attempt log
        assert list(j.failures()) == ["k2"] and j.failure_count() == 3
        assert j.get("k1").ok


_V1_SCHEMA = """
CREATE TABLE results (key TEXT PRIMARY KEY, text TEXT NOT NULL, input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL, cost REAL NOT NULL, latency_s REAL NOT NULL, created_at REAL NOT NULL)
    WITHOUT ROWID;
CREATE TABLE failures (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, error TEXT NOT NULL,
    latency_s REAL NOT NULL, created_at REAL NOT NULL);
CREATE INDEX failures_key ON failures(key);
INSERT INTO results VALUES ('k1', 'answer 1', 1, 2, 0.001, 0.5, 0.0);
INSERT INTO failures (key, error, latency_s, created_at) VALUES ('k2', 'HTTP 500', 0.1, 0.0);
PRAGMA user_version = 1;
"""


def test_a_v1_journal_is_upgraded_in_place_and_keeps_its_answers(tmp_path):
    import sqlite3

    path = tmp_path / "j.sqlite"
    with sqlite3.connect(path) as con:  # as an earlier specdsl left it
        con.executescript(_V1_SCHEMA)
    con.close()
    with RequestJournal(path) as j:
        assert j.get("k1") == ok(1) and list(j.failures()) == ["k2"]
        j.put(ok(1, "a later answer"))  # first answer wins across the upgrade
        j.put(ok(3))
        assert j.get("k1").text == "answer 1" and j.get("k3") == ok(3) and len(j) == 2
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 2
    con.close()


def test_a_journal_from_a_newer_specdsl_is_refused(tmp_path):
    import sqlite3

    path = tmp_path / "j.sqlite"
    RequestJournal(path).close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(RuntimeError, match="newer specdsl"):
        RequestJournal(path)


def test_answers_a_killed_run_left_unfiled_are_filed_when_the_journal_opens(tmp_path):
    import sqlite3

    path = tmp_path / "j.sqlite"
    with RequestJournal(path) as j:
        j.put(ok(1, "first"))
    con = sqlite3.connect(path)  # what a run killed between appending and filing leaves behind
    con.executemany("INSERT INTO incoming (key, text, input_tokens, output_tokens, cost, latency_s, created_at) "
                    "VALUES (?, ?, 1, 2, 0.001, 0.5, 0.0)",
                    [("k1", "second"), ("k2", "answer 2"), ("k2", "a repeat")])
    con.commit()
    con.close()
    with RequestJournal(path) as j:
        con = sqlite3.connect(path)
        assert con.execute("SELECT COUNT(*) FROM incoming").fetchone()[0] == 0  # filed on open
        assert dict(con.execute("SELECT key, text FROM results")) == {"k1": "first", "k2": "answer 2"}
        con.close()
        assert j.get("k1").text == "first" and j.get("k2").text == "answer 2"


def test_the_answers_view_shows_every_answer_filed_or_not_once_each(tmp_path):
    import sqlite3

    path = tmp_path / "j.sqlite"
    with RequestJournal(path) as j:
        j.put(ok(1, "first"))
        j.get("k1")  # a read files what came in: k1 is in `results` now
        j.put_many([ok(1, "later"), ok(2, "two"), ok(2, "a repeat"), ok(3)])  # in `incoming`, not filed yet
        con = sqlite3.connect(path)  # another process looking while the run goes on
        seen = con.execute("SELECT key, text FROM answers ORDER BY key").fetchall()
        assert con.execute("SELECT COUNT(*) FROM incoming").fetchone()[0] == 4
        con.close()
        assert seen == [("k1", "first"), ("k2", "two"), ("k3", "answer 3")]


def test_get_many_handles_large_batches(tmp_path):
    with RequestJournal(tmp_path / "j.sqlite") as j:
        j.put_many(ok(i) for i in range(2500))
        got = j.get_many(f"k{i}" for i in range(0, 3000, 1))
        assert len(got) == 2500


def test_wal_mode(tmp_path):
    with RequestJournal(tmp_path / "j.sqlite"):
        import sqlite3

        con = sqlite3.connect(tmp_path / "j.sqlite")
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()


def test_thread_safe(tmp_path):
    with RequestJournal(tmp_path / "j.sqlite") as j:
        errors = []

        def writer(t: int) -> None:
            try:
                for i in range(200):
                    j.put(ok(t * 1000 + i))
                    if i % 50 == 0:
                        j.get_many([f"k{t * 1000}"])
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors and len(j) == 1600


_WRITER = textwrap.dedent("""
    import sys
    from specdsl.execute.journal import RequestJournal
    from specdsl.contract.hookspecs import GenResult
    j = RequestJournal(sys.argv[1])
    start, stop = int(sys.argv[2]), int(sys.argv[3])
    for i in range(start, stop):
        j.put(GenResult(key=f"k{i}", text="x" * 200, input_tokens=1, output_tokens=1))
        print(i, flush=True)   # printed only after put() returned: this one must survive
    if stop < 10**9:
        j.close()
""")


def test_survives_sigkill_of_the_writer(tmp_path):
    path = tmp_path / "j.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), "0", str(10**9)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    try:
        for line in proc.stdout:
            acknowledged = int(line)
            if acknowledged >= 300:
                break
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream, no chance to close or checkpoint
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL and acknowledged >= 300
    with RequestJournal(path) as j:
        got = j.get_many(f"k{i}" for i in range(acknowledged + 1))
        assert len(got) == acknowledged + 1  # every put() that returned is there
        assert len(j) >= acknowledged + 1
        j.put(ok(10**9 + 1))  # and the journal is writable after recovery
        integrity = j._db.execute("PRAGMA integrity_check").fetchone()[0]
        assert integrity == "ok"


def test_two_processes_share_one_journal(tmp_path):
    path = tmp_path / "j.sqlite"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(a), str(a + 300)], cwd=ROOT,
                              stdout=subprocess.DEVNULL)
             for a in (0, 1000)]
    with RequestJournal(path) as j:  # a third writer in this process, at the same time
        for i in range(2000, 2100):
            j.put(ok(i))
        for p in procs:
            assert p.wait(60) == 0
        assert len(j) == 700


def test_put_is_fast_enough_for_inline_use(tmp_path):
    # Every result is committed on the event loop that drives the requests; at ~300 results/s this
    # must stay well under a millisecond (measured ~0.1 ms here with synchronous=NORMAL).
    with RequestJournal(tmp_path / "j.sqlite") as j:
        t = time.perf_counter()
        for i in range(300):
            j.put(ok(i))
        assert (time.perf_counter() - t) / 300 < 0.003


# --------------------------------------------------------------------------------------------------
# JournalWriter: group commits off the request loop
# --------------------------------------------------------------------------------------------------


def counting(journal) -> list[int]:
    """Count the transactions a journal commits (wrapping its real put_many: the rows still land)."""
    commits: list[int] = []
    real_put_many = journal.put_many

    def put_many(results):
        results = list(results)
        commits.append(len(results))
        real_put_many(results)

    journal.put_many = put_many  # type: ignore[method-assign]
    return commits


def test_writer_groups_a_fast_stream_and_commits_a_slow_one_at_once(tmp_path):
    from specdsl.execute.journal import JournalWriter

    with RequestJournal(tmp_path / "j.sqlite") as j:
        commits = counting(j)
        writer = JournalWriter(j, interval_s=0.05, burst=2, max_batch=50)
        threads = [threading.Thread(target=lambda base=b: [writer.put(ok(base + i)) for i in range(500)])
                   for b in (0, 1000, 2000, 3000)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(commits) < 200 and max(commits) <= 50  # grouped, never past max_batch
        deadline = time.monotonic() + 5
        while len(j) < 2000 and time.monotonic() < deadline:  # the flusher commits the stale rest
            time.sleep(0.01)
        assert len(j) == 2000 and sum(commits) == 2000

        time.sleep(0.06)  # a new interval: a slow result is committed before put returns
        writer.put(GenResult(key="bad", error="HTTP 500"))
        assert set(j.failures()) == {"bad"}
        writer.close()
        with pytest.raises(RuntimeError, match="closed"):
            writer.put(ok(9999))


def test_writer_hands_a_failed_commit_to_the_caller(tmp_path):
    from specdsl.execute.journal import JournalWriter

    with RequestJournal(tmp_path / "j.sqlite") as j:
        writer = JournalWriter(j)
        with pytest.raises(ValueError, match="needs text"):
            writer.put(GenResult(key="k", text=None))  # a success without text is refused by put_many
            writer.flush()
        writer.put(ok(1))  # the writer keeps going after reporting the error
        writer.close()
        assert j.get("k1") == ok(1)
