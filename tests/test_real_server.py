"""Runs against a real OpenAI-compatible server: `transformers serve` with the embedded default model.

tests/fakeserver.py scripts faults; here the server is real (FastAPI, uvicorn, continuous batching on
the CPU), so a run, a server killed mid-run (SIGKILL, in-flight requests lost) and the resume after a
restart are checked end to end through `specdsl run` subprocesses, the way a user meets them:

* an uninterrupted run and a run whose server is killed and restarted export the same bytes;
* the killed run ends incomplete with one clear message, and the filter and export after the
  generate step are neither committed nor written;
* the resumed run sends exactly the requests the journal lacks;
* a model name the server does not serve fails with the server's own `detail` text.

Slow and multiprocess (about two minutes on 2 CPU cores: two server starts of ~20 s, 64 + 64 short
greedy answers): `pytest -m slow tests/test_real_server.py`. Needs the `serve` extra (fastapi, uvicorn)
and the embedded model (fetched from PyPI on first use).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.realserver import RealServer

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

N_PROMPTS = 64
KILL_AFTER = 16  # journaled answers before the server is killed: a quarter of the run
SPEC = """\
specdsl: 1
name: real-server
models:
  m:
    backend: litellm
    model: hosted_vllm/{model}
    api_base: "{api_base}"
    temperature: 0
    max_tokens: 16
    concurrency: 16
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from specdsl.modelcache.models import resolve_model

    srv = RealServer(resolve_model("smollm2-135m-instruct"), log_dir=tmp_path_factory.mktemp("serve-logs"))
    try:
        yield srv.start()
    finally:
        srv.kill()


def write_spec(folder: Path, srv: RealServer, *, model: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(
        json.dumps({"id": f"p{i:02d}", "q": f"What is {i} plus {i + 3}? Answer in one short sentence."}) + "\n"
        for i in range(N_PROMPTS)))
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(model=model or srv.model, api_base=srv.api_base))
    return spec


def specdsl_command(*args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return [sys.executable, "-m", "specdsl", *args], env


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd, env = specdsl_command(*args)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def journaled(spec: Path) -> dict[str, str]:
    """The answers in the spec's request journal, by request key (empty before the first one)."""
    path = spec.parent / ".specdsl" / "journal.sqlite"
    if not path.exists():
        return {}
    try:
        with sqlite3.connect(path, timeout=1) as conn:
            return dict(conn.execute("select key, text from answers"))  # filed or not yet filed
    except sqlite3.Error:  # the run is still creating it
        return {}


def last_manifest(spec: Path) -> dict:
    return json.loads((spec.parent / ".specdsl" / "run.json").read_text())


def test_a_model_the_server_does_not_serve_fails_with_the_servers_detail(server, tmp_path):
    spec = write_spec(tmp_path, server, model="not-served")
    done = cli("run", "--no-progress", str(spec))
    output = " ".join((done.stdout + done.stderr).split())  # the terminal table wraps long lines
    assert done.returncode == 1, output
    assert "Traceback" not in output
    # transformers serve answers a wrong model with HTTP 400 {"detail": "Server is pinned to ..."}: the
    # message is the server's text, not "None", and it is given once for the whole step.
    assert "Server is pinned to" in output and "requested 'not-served'" in output, output
    assert output.count("Server is pinned to") == 1, output
    assert "HTTP 400" in output and ": None" not in output
    # A 400 is never retried: at most one request per row reached the server.
    assert server.log_tail(10**9).count('"POST /v1/chat/completions HTTP/1.1" 400') <= N_PROMPTS
    assert not (tmp_path / "out").exists()


def test_a_real_server_killed_mid_run_resumes_after_restart_to_the_uninterrupted_export(server, tmp_path):
    # A: one uninterrupted run.
    spec_a = write_spec(tmp_path / "a", server)
    first = cli("run", "--no-progress", str(spec_a))
    assert first.returncode == 0, first.stdout + first.stderr
    export_a = tmp_path / "a" / "out"
    rows_a = [json.loads(line) for line in (export_a / "data.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows_a] == [f"p{i:02d}" for i in range(N_PROMPTS)]
    assert all(r["response"].strip() for r in rows_a)
    # What specdsl exported is what a bare client gets from the same server.
    assert server.chat(rows_a[0]["q"])["choices"][0]["message"]["content"] == rows_a[0]["response"]

    # B: the same spec in another folder; the server is SIGKILLed once a quarter of the answers are journaled.
    spec_b = write_spec(tmp_path / "b", server)
    assert spec_b.read_text() == spec_a.read_text()
    cmd, env = specdsl_command("run", "--no-progress", str(spec_b))
    run_b = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while len(journaled(spec_b)) < KILL_AFTER and time.monotonic() < deadline and run_b.poll() is None:
            time.sleep(0.05)
        assert run_b.poll() is None, "the run ended before the server was killed:\n" + run_b.stdout.read()
        server.kill()
        output, _ = run_b.communicate(timeout=180)
    finally:
        if run_b.poll() is None:
            run_b.kill()
            run_b.wait()
    output = " ".join(output.split())  # the terminal table wraps long lines
    assert run_b.returncode == 1, output
    assert "Traceback" not in output
    assert "cannot reach" in output and "is the server running?" in output, output
    before = journaled(spec_b)
    assert KILL_AFTER <= len(before) < N_PROMPTS
    status = {n["id"]: n["status"] for n in last_manifest(spec_b)["nodes"]}
    assert status["answers"] == "incomplete", status
    assert status["kept"] != "ran" and status["out"] != "ran", status
    assert not (tmp_path / "b" / "out").exists()  # no partial dataset is written
    shown = cli("plan", str(spec_b))
    assert shown.returncode == 0, shown.stderr
    downstream = shown.stdout.split("answers", 1)[1]
    assert "cached" not in downstream.replace("not cached", ""), shown.stdout

    # Restart the server (same port) and run again: only the requests the journal lacks are sent.
    server.start()
    resumed = cli("run", "--no-progress", str(spec_b))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    missing = N_PROMPTS - len(before)
    assert server.completions() == missing, server.log_tail()
    totals = last_manifest(spec_b)["totals"]
    # `requests` counts every request of the step, `cached_requests` those the journal answered.
    assert (totals["requests"], totals["cached_requests"]) == (N_PROMPTS, len(before)), totals
    after = journaled(spec_b)
    assert len(after) == N_PROMPTS
    assert {key: after[key] for key in before} == before  # the first run's answers are the ones used

    # Greedy decoding on the CPU gives the same text whatever the batch, so the export is byte-identical.
    export_b = tmp_path / "b" / "out"
    assert (export_b / "data.jsonl").read_bytes() == (export_a / "data.jsonl").read_bytes()
    assert (export_b / "README.md").read_bytes() == (export_a / "README.md").read_bytes()
