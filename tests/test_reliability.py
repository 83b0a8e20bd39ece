"""Faults a real run meets: a server that is down, killed runs, two runs at once, a broken store.

Runs go through `specdsl run` subprocesses or the API against tests/fakeserver.py on 127.0.0.1; nothing
of specdsl's is mocked.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specdsl import api
from tests.conftest import ROOT
from tests.fakeserver import FakeServer

STALE_SPEC = """\
specdsl: 1
name: stale-downstream
models:
  m: {{backend: litellm, model: hosted_vllm/m, api_base: "http://127.0.0.1:{port}/v1", max_retries: 0}}
sources:
  rows: {{path: rows.jsonl}}
steps:
  - id: answers
    generate: {{from: rows, model: m, user: "{{{{ row.q }}}}"}}
  - id: kept
    filter: {{from: answers, where: "{{{{ row.response }}}}"}}
  - id: out
    export: {{from: kept, path: out}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "specdsl", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def stale_spec(tmp_path: Path, port: int) -> Path:
    (tmp_path / "rows.jsonl").write_text('{"id":"a","q":"6*7?"}\n{"id":"b","q":"40+2?"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(STALE_SPEC.format(port=port))
    return spec


def test_nothing_downstream_of_an_incomplete_step_is_cached_or_exported(tmp_path):
    port = free_port()
    spec = stale_spec(tmp_path, port)
    first = cli("run", "--no-progress", str(spec))
    assert first.returncode == 1, first.stdout + first.stderr
    assert not (tmp_path / "out").exists()  # no partial (here: empty) dataset is written
    shown = cli("plan", str(spec))
    assert shown.returncode == 0, shown.stderr
    after_source = shown.stdout.split("answers generate", 1)[1]
    assert "cached" not in after_source.replace("not cached", ""), shown.stdout
    with FakeServer(port=port):
        second = cli("run", "--no-progress", str(spec))
    assert second.returncode == 0, second.stdout + second.stderr
    lines = (tmp_path / "out" / "data.jsonl").read_text().splitlines()
    assert [json.loads(line)["response"] for line in lines] == ["echo: 6*7?", "echo: 40+2?"]
    manifest = json.loads((tmp_path / ".specdsl" / "run.json").read_text())
    status = {n["id"]: (n["status"], n["rows"]) for n in manifest["nodes"]}
    assert status["kept"] == ("ran", 2) and status["out"] == ("ran", 1)


def test_a_node_stored_while_its_input_is_not_is_recomputed(tmp_path):
    """A store an older specdsl left: `kept` committed with 0 rows while `answers` never was."""
    from specdsl.execute.store import Store

    with FakeServer() as srv:
        spec = stale_spec(tmp_path, srv.port)
        plan = api.compile_spec(spec)
        store = Store(tmp_path / ".specdsl")
        staging = store.staging(plan.node("kept").fingerprint)
        store.commit(plan.node("kept").fingerprint, [], {"node": "kept"}, staging)
        from specdsl.execute.runner import cached_nodes

        assert "kept" not in cached_nodes(plan, store)
        result = api.run_plan(plan, progress=False)
        assert result.ok and len(result.rows("kept")) == 2


def test_a_second_run_of_a_store_refuses_and_a_killed_runs_staging_is_cleaned(tmp_path):
    """Two real `specdsl run` processes on one store: the second refuses at once, naming the first; after
    the first is SIGKILLed, the next run removes the staging folder it left and finishes."""
    import signal

    rows = "".join(json.dumps({"id": f"r{i}", "q": f"q{i}"}) + "\n" for i in range(20))
    with FakeServer(latency=0.3) as srv:
        spec = stale_spec(tmp_path, srv.port)
        (tmp_path / "rows.jsonl").write_text(rows)
        spec.write_text(spec.read_text().replace("max_retries: 0}", "max_retries: 0, concurrency: 1}"))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        first = subprocess.Popen([sys.executable, "-m", "specdsl", "run", "--no-progress", str(spec)], cwd=ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            tmp = tmp_path / ".specdsl" / "tmp"
            deadline = time.time() + 60
            while srv.request_count < 2 and time.time() < deadline:
                time.sleep(0.05)
            left = list(tmp.iterdir())
            assert left, "the generate step should be staging"
            second = cli("run", "--no-progress", str(spec))
            assert second.returncode == 1
            assert "another run is using the run store" in second.stderr and f"pid {first.pid}" in second.stderr
            assert "Traceback" not in second.stderr
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert all(p.exists() for p in left)  # what the killed run left behind
        third = cli("run", "--no-progress", str(spec))
        assert third.returncode == 0, third.stdout + third.stderr
        assert not any(p.exists() for p in left)
        assert len((tmp_path / "out" / "data.jsonl").read_text().splitlines()) == 20


def test_inspect_never_prints_terminal_escapes_from_row_text(tmp_path):
    hostile = "plain \x1b]0;pwned\x07 \x1b[31mred\x1b[0m \x9b2J end"
    (tmp_path / "rows.jsonl").write_text(json.dumps({"id": "a", "text": hostile}) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("specdsl: 1\nname: esc\nsources:\n  rows: {path: rows.jsonl}\nsteps:\n"
                    "  - id: copy\n    map: {from: rows, columns: {t: \"{{ row.text }}\"}}\n")
    assert api.run_plan(api.compile_spec(spec), progress=False).ok
    shown = cli("inspect", str(spec), "--node", "copy")
    assert shown.returncode == 0, shown.stderr
    assert "end" in shown.stdout and "plain" in shown.stdout
    assert not any(c in shown.stdout for c in "\x1b\x07\x9b"), repr(shown.stdout)


def test_a_key_cut_by_a_schema_message_is_redacted_before_the_cut(tmp_path):
    key = "sk-proj-" + "Ab3" * 30  # long: the schema message is cut inside it
    spec = tmp_path / "spec.yaml"
    spec.write_text("specdsl: 1\nname: leak\nmodels:\n  m: {backend: litellm, model: openai/x, api_key: "
                    f"'{'x' * 140}{key}'}}\nsteps: []\n")
    done = cli("validate", str(spec))
    assert done.returncode == 2
    for i in range(0, len(key) - 12, 6):
        assert key[i:i + 12] not in done.stdout + done.stderr, (key[i:i + 12], done.stderr)
