"""The executor end to end against a real (fake) provider over HTTP: cache, resume, failures, flags.

The litellm backend talks to tests/fakeserver.py on 127.0.0.1; nothing of ours is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specdsl import api
from specdsl.errors import RunError
from tests.conftest import ROOT
from tests.fakeserver import FakeServer

SPEC = """\
specdsl: 1
name: run-test
models:
  teacher:
    backend: litellm
    model: openai/fake
    api_base: {api_base}
    api_key: ${{env:SPECDSL_TEST_KEY}}
    concurrency: {concurrency}
    max_retries: {max_retries}
    timeout_s: 5
sources:
  problems: {{path: problems.jsonl}}
steps:
  - id: answers
    generate: {{from: problems, model: teacher, user: "Q: {{{{ row.question }}}}"}}
  - id: shaped
    map: {{from: answers, columns: {{short: "{map_template}"}}}}
"""


def write_spec(tmp_path: Path, srv: FakeServer, *, n: int = 6, concurrency: int = 4, max_retries: int = 2,
               map_template: str = "{{ row.response[:12] }}") -> Path:
    (tmp_path / "problems.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "question": f"question {i}"}) + "\n" for i in range(n)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(api_base=srv.api_base, concurrency=concurrency, max_retries=max_retries,
                                map_template=map_template))
    return spec


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("SPECDSL_TEST_KEY", "sk-test-secret-value")


def run(spec: Path, **kw):
    return api.run_plan(api.compile_spec(spec), store_dir=spec.parent / "store", progress=False, **kw)


def test_second_run_is_all_cache_hits_and_a_changed_step_reruns_only_itself(tmp_path):
    with FakeServer() as srv:
        spec = write_spec(tmp_path, srv)
        first = run(spec)
        assert first.ok
        assert srv.request_count == 6
        assert [r["response"] for r in first.rows("answers")] == [f"echo: Q: question {i}" for i in range(6)]
        second = run(spec)
        assert {n.status for n in second.nodes} == {"cached"}
        assert srv.request_count == 6  # zero new requests
        write_spec(tmp_path, srv, map_template="{{ row.response | upper }}")
        third = run(spec)
        status = {n.id: n.status for n in third.nodes}
        assert status == {"problems": "cached", "answers": "cached", "shaped": "ran"}
        assert srv.request_count == 6
        assert third.rows("shaped")[0]["short"] == "ECHO: Q: QUESTION 0"


def test_identical_requests_are_sent_once_across_nodes(tmp_path):
    with FakeServer() as srv:
        spec = write_spec(tmp_path, srv)
        text = spec.read_text() + ('  - id: again\n    generate: {from: problems, model: teacher, '
                                   'user: "Q: {{ row.question }}", into: other}\n')
        spec.write_text(text)
        result = run(spec)
        assert result.ok
        assert srv.request_count == 6  # `again` asks the same questions: answered from the journal


def test_failed_rows_are_kept_reported_and_retried_next_run(tmp_path):
    broken = {"Q: question 2"}
    with FakeServer(fault_fn=lambda prompt, attempt: "500" if prompt in broken else None) as srv:
        spec = write_spec(tmp_path, srv, max_retries=1)
        result = run(spec)
        assert not result.ok
        report = result.report("answers")
        assert report.status == "incomplete" and report.stats["failed"] == 1
        assert any("q2" in e for e in report.stats["errors"])
        assert srv.attempts("Q: question 2") == 2  # first try + one retry
        before = srv.request_count
        broken.clear()
        again = run(spec)
        assert again.ok
        assert srv.request_count == before + 1  # only the failed request is sent again
        assert again.rows("answers")[2]["response"] == "echo: Q: question 2"


def test_fail_fast_stops_at_the_first_failure(tmp_path):
    with FakeServer(fault_fn=lambda prompt, attempt: "400" if prompt == "Q: question 0" else None) as srv:
        spec = write_spec(tmp_path, srv, concurrency=1, max_retries=0)
        with pytest.raises(RunError):
            run(spec, fail_fast=True)


def test_missing_env_var_names_it_and_a_rejected_key_never_shows_the_value(tmp_path, monkeypatch):
    with FakeServer(api_key="sk-the-right-one") as srv:
        spec = write_spec(tmp_path, srv, max_retries=0)
        monkeypatch.delenv("SPECDSL_TEST_KEY")
        with pytest.raises(RunError) as info:
            run(spec)
        assert "SPECDSL_TEST_KEY" in str(info.value)
        monkeypatch.setenv("SPECDSL_TEST_KEY", "sk-wrong-secret-value")
        result = run(spec)
        errors = " ".join(result.report("answers").stats["errors"])
        assert "SPECDSL_TEST_KEY" in errors
        assert "sk-wrong-secret-value" not in errors
        manifest = result.manifest_path.read_text()
        assert "sk-wrong-secret-value" not in manifest


def test_dry_run_until_and_only(tmp_path):
    with FakeServer() as srv:
        spec = write_spec(tmp_path, srv)
        dry = run(spec, dry_run=True)
        assert {n.status for n in dry.nodes} == {"would-run"} and srv.request_count == 0
        until = run(spec, until="answers")
        assert [n.id for n in until.nodes] == ["problems", "answers"]
        assert srv.request_count == 6
        only = run(spec, only="shaped")
        assert [n.id for n in only.nodes] == ["shaped"] and only.report("shaped").status == "ran"
        with pytest.raises(RunError, match="no such node"):
            run(spec, only="nope")


def test_malformed_source_line_is_reported_with_file_and_line(tmp_path):
    with FakeServer() as srv:
        spec = write_spec(tmp_path, srv)
        with (tmp_path / "problems.jsonl").open("a") as fh:
            fh.write("{not json\n")
        with pytest.raises(RunError, match=r"problems.jsonl:7: malformed JSON line"):
            run(spec)


def test_a_template_failing_on_one_row_names_the_row(tmp_path):
    with FakeServer() as srv:
        spec = write_spec(tmp_path, srv)
        (tmp_path / "problems.jsonl").write_text('{"id": "a", "question": "x"}\n{"id": "b", "question": null}\n')
        spec.write_text(spec.read_text().replace('"Q: {{ row.question }}"', '"Q: {{ row.question.upper() }}"'))
        with pytest.raises(RunError, match="id='b'"):
            run(spec)


def _journal_count(store: Path) -> int:
    path = store / "journal.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=1) as conn:
            tables = [t for (t,) in conn.execute("select name from sqlite_master where type='table'")]
            return max((conn.execute(f"select count(*) from {t}").fetchone()[0] for t in tables), default=0)
    except sqlite3.Error:
        return 0


@pytest.mark.multiprocess
def test_sigkill_mid_generation_then_rerun_reissues_nothing_and_matches(tmp_path):
    """A real `specdsl run` subprocess is SIGKILLed mid-generation; the rerun re-sends zero completed requests."""
    n = 24
    with FakeServer(latency=0.25) as srv:
        spec = write_spec(tmp_path, srv, n=n, concurrency=2)
        env = {**os.environ, "SPECDSL_TEST_KEY": "sk-test-secret-value", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        cmd = [sys.executable, "-m", "specdsl.cli", "run", str(spec), "--store", str(tmp_path / "store"),
               "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while _journal_count(tmp_path / "store") < 6 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = _journal_count(tmp_path / "store")
        assert 6 <= done_before < n
        sent_before = srv.attempts_by_prompt()
        rerun = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        attempts = srv.attempts_by_prompt()
        # Every prompt was answered; none that completed before the kill was sent again.
        assert set(attempts) == {f"Q: question {i}" for i in range(n)}
        in_flight = sum(sent_before.values()) - done_before  # sent, but not completed when killed
        assert 0 <= in_flight <= 2  # concurrency 2
        # Completed requests are never sent again; only those in flight at the kill are.
        assert sum(attempts.values()) == n + in_flight
        final = api.compile_spec(spec)
        from specdsl.execute.store import Store

        rows = Store(tmp_path / "store").load(final.node("answers").fingerprint)
    # An uninterrupted run against a fresh server gives the same table.
    with FakeServer() as srv2:
        clean = tmp_path / "clean"
        clean.mkdir()
        spec2 = write_spec(clean, srv2, n=n)
        spec2.write_text(spec.read_text().replace(srv.api_base, srv2.api_base))
        other = run(spec2).rows("answers")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "response_prompt"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(other)


def test_each_run_keeps_its_own_manifest_even_within_one_second(tmp_path):
    with FakeServer() as srv:
        spec = write_spec(tmp_path, srv)
        first = run(spec)
        second = run(spec)  # all cached: well under a second
        third = run(spec)
    paths = {first.manifest_path, second.manifest_path, third.manifest_path}
    assert len(paths) == 3 and all(p.is_file() for p in paths)
    assert json.loads(first.manifest_path.read_text())["totals"]["requests"] == 6
    assert json.loads(third.manifest_path.read_text())["totals"]["requests"] == 0
    assert (third.manifest_path.parent / "report.html").is_file()
