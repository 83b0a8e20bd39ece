"""No resolved secret ever leaves a run: a provider that echoes the request's key or headers in an error
body, or in a 200 that is not JSON, is driven through a real ``specdsl run`` subprocess against
tests/fakeserver.py, and then every byte the run wrote (stdout, stderr, run.json, report.html, the journal's
tables, the store) is searched for any piece of the key and of a header secret."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from specdsl.contract.hookspecs import GenRequest, GenResult
from specdsl.errors import RunError
from tests.conftest import ROOT
from tests.fakeserver import FakeServer

KEY = "sk-LEAKCHECKkey0123456789abcdefQRSTUV"
HEADER = "hdr-LEAKCHECKheader9876543210zyxwvu"

# One outcome per row; the runs go one request at a time, so the 401 (which stops the step) comes last.
OUTCOMES = (["echo-headers:400", "nonjson-auth"]
            + [f"echo-auth:{at}" for at in range(270, 306, 5)]  # the key straddles the 300-character cut
            + ["echo-headers:401"])


def pieces(secret: str, n: int = 10) -> list[str]:
    return [secret[i:i + n] for i in range(len(secret) - n + 1)]


def leaks(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [p for secret in (KEY, HEADER) for p in pieces(secret) if p in text]


def sqlite_text(path: Path) -> str:
    """Every value of every table of a SQLite file, as text."""
    out = []
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):
                out.extend(str(v) for v in row)
    return "\n".join(out)


@pytest.fixture
def leaky_run(tmp_path):
    rows = [{"id": f"r{i}", "q": f"question {i}"} for i in range(len(OUTCOMES))]
    outcome_of = {f"question {i}": o for i, o in enumerate(OUTCOMES)}
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeServer(fault_fn=lambda prompt, attempt: outcome_of.get(prompt)) as srv:
        (tmp_path / "spec.yaml").write_text(f"""specdsl: 1
name: leaks
models:
  m:
    backend: litellm
    model: hosted_vllm/fake
    api_base: "{srv.api_base}"
    api_key: "${{env:LEAK_TEST_KEY}}"
    extra_headers: {{X-Team-Token: "${{env:LEAK_TEST_HEADER}}"}}
    concurrency: 1
    max_retries: 0
    timeout_s: 10
sources:
  rows: {{path: rows.jsonl}}
steps:
  - id: answers
    generate: {{from: rows, model: m, user: "{{{{ row.q }}}}"}}
""")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400", "LEAK_TEST_KEY": KEY,
               "LEAK_TEST_HEADER": HEADER}
        done = subprocess.run([sys.executable, "-m", "specdsl", "run", "--no-progress", str(tmp_path / "spec.yaml")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        seen = {r.prompt: r.auth for r in srv.requests}
    # The server did get (and echo) the secrets: otherwise this test would prove nothing.
    assert set(seen) == set(outcome_of) and set(seen.values()) == {KEY}, seen
    return tmp_path, done


def test_no_piece_of_a_secret_reaches_any_output_of_a_run(leaky_run):
    folder, done = leaky_run
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output
    assert not leaks(output), (leaks(output), output)

    store = folder / ".specdsl"
    manifest = store / "run.json"
    report = next(store.rglob("report.html"))
    journals = list(store.rglob("*.sqlite"))
    assert manifest.exists() and journals
    failures = "".join(sqlite_text(j) for j in journals)
    # The errors were kept, each with the provider's words (the 401 naming the variable, never the key).
    assert "the request was refused" in failures and "malformed response" in failures, failures
    assert "authentication failed (HTTP 401)" in failures and "LEAK_TEST_KEY" in failures, failures
    for path, text in [(manifest, manifest.read_text()), (report, report.read_text())] + \
                      [(j, sqlite_text(j)) for j in journals]:
        assert not leaks(text), (path, leaks(text))
    # And every other byte written anywhere (parquet, logs, staging, SQLite pages and journals).
    for path in folder.rglob("*"):
        if path.is_file():
            assert not leaks(path.read_bytes()), (path, leaks(path.read_bytes()))



class EchoingBackend:
    """A third-party backend that quotes the key it was given in every error (and cuts nothing)."""

    name = "echoing"

    def generate(self, options, requests, on_result):
        for r in requests:
            on_result(GenResult(key=r.key, error=f"refused: key {options['api_key']} is not allowed here"))


def test_any_backends_errors_are_redacted_before_the_journal_sees_them(tmp_path, monkeypatch):
    """The runner redacts every failed request's error of the run's resolved secrets, whatever backend made
    it: each becomes the reference it was resolved from."""
    from specdsl import secrets
    from specdsl.execute.generation import run_requests
    from specdsl.execute.journal import RequestJournal

    monkeypatch.setenv("LEAK_TEST_KEY", KEY)
    options = secrets.resolve({"model": "m", "api_key": "${env:LEAK_TEST_KEY}"}, model="m")
    requests = [GenRequest(key=f"k{i}", messages=({"role": "user", "content": str(i)},), row_id=str(i))
                for i in range(3)]
    with RequestJournal(tmp_path / "journal.sqlite") as journal:
        out = run_requests(EchoingBackend(), options, requests, journal)
        with pytest.raises(RunError) as info:
            run_requests(EchoingBackend(), options, requests, journal, fail_fast=True)
    assert {r.error for r in out.values()} == {"refused: key ${env:LEAK_TEST_KEY} is not allowed here"}
    assert "${env:LEAK_TEST_KEY}" in str(info.value) and not leaks(str(info.value))
    stored = sqlite_text(tmp_path / "journal.sqlite")
    assert "${env:LEAK_TEST_KEY}" in stored and not leaks(stored)


@pytest.mark.parametrize("at", range(280, 305))
def test_an_excerpt_is_redacted_before_it_is_cut(at):
    """A secret straddling the cut is never printed in part, by value or (a key no option held) by shape."""
    from specdsl.secrets import excerpt

    other = "sk-proj0123456789unknownKEYabcdef"
    text = "x" * at + f"Bearer {KEY} and {other} end"
    for secrets, limit in (([KEY], 300), ({KEY: "LEAK_TEST_KEY"}, 300), ([KEY], at + 12)):
        shown = excerpt(text, secrets, limit)
        assert len(shown) <= limit and not leaks(shown) and not [p for p in pieces(other) if p in shown], shown
    assert excerpt("<html>proxy: Authorization: Bearer abc123def456</html>", ()) == "<html>proxy: Authorization: ***"
