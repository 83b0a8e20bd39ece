"""Provider faults through the litellm backend against tests/fakeserver.py (real HTTP, nothing mocked):
a server that is down, the error bodies real servers return, configuration errors, unknown prices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from specdsl.backends.litellm.backend import LiteLLMBackend
from specdsl.backends.litellm.transports import error_detail
from specdsl.contract.hookspecs import GenRequest, GenResult
from tests.conftest import ROOT
from tests.fakeserver import FakeServer


def req(i) -> GenRequest:
    return GenRequest(key=f"key-{i}", messages=({"role": "user", "content": f"prompt {i}"},), params={},
                      row_id=str(i))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def collect(options: dict, requests: list[GenRequest]) -> dict[str, GenResult]:
    out: dict[str, GenResult] = {}
    LiteLLMBackend().generate(options, requests, lambda r: out.__setitem__(r.key, r))
    return out


@pytest.mark.parametrize("model", ["hosted_vllm/m", "openai/m"])
def test_a_closed_port_fails_a_thousand_rows_in_seconds_with_one_message(model):
    port = closed_port()
    options = {"model": model, "api_base": f"http://127.0.0.1:{port}/v1", "api_key": "k", "timeout_s": 5}
    t0 = time.monotonic()
    out = collect(options, [req(i) for i in range(1000)])  # default retries (6) and backoff (1 s)
    elapsed = time.monotonic() - t0
    assert len(out) == 1000 and not any(r.ok for r in out.values())
    messages = {r.error for r in out.values()}
    assert len(messages) == 1, list(messages)[:3]
    (message,) = messages
    assert "cannot reach" in message and str(port) in message and "is the server running" in message
    assert elapsed < 30, elapsed


def test_a_run_against_a_closed_port_prints_one_error_line(tmp_path):
    port = closed_port()
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "q": f"q{i}"}) + "\n"
                                                 for i in range(1000)))
    (tmp_path / "spec.yaml").write_text(f"""specdsl: 1
name: down
models:
  m: {{backend: litellm, model: hosted_vllm/m, api_base: "http://127.0.0.1:{port}/v1"}}
sources:
  rows: {{path: rows.jsonl}}
steps:
  - id: answers
    generate: {{from: rows, model: m, user: "{{{{ row.q }}}}"}}
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250"}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "specdsl", "run", "--no-progress", str(tmp_path / "spec.yaml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 30
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert out.count("cannot reach") == 1, out
    assert "1000 rows (r" in out and "Traceback" not in out


def test_a_server_that_comes_back_does_not_trip_the_breaker():
    """Dropped connections and 5xx mean the server answers: they are retried as before, never tripped on."""
    with FakeServer(faults=["503", "drop", "503"]) as srv:
        out = collect({"model": "hosted_vllm/fake", "api_base": srv.api_base, "retry_backoff_s": 0.01,
                       "timeout_s": 5}, [req(i) for i in range(40)])
    assert all(r.ok for r in out.values())


BODIES = {
    "fastapi": (b'{"detail": "The model \'x\' is not served here"}', "The model 'x' is not served here"),
    "fastapi-validation": (b'{"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}',
                           "body.messages: field required"),
    "vllm": (b'{"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError", '
             b'"param": null, "code": 404}', "The model `x` does not exist."),
    "openai": (b'{"error": {"message": "Invalid value for temperature", "type": "invalid_request_error"}}',
               "Invalid value for temperature"),
    "litellm-proxy": (b'{"error": {"message": "litellm.BadRequestError: no such model", "type": "None", '
                      b'"param": "None", "code": "400"}}', "litellm.BadRequestError: no such model"),
    "tgi": (b'{"error": "Input validation error", "error_type": "validation"}', "Input validation error"),
    "html": (b"<html>502 Bad Gateway</html>", "<html>502 Bad Gateway</html>"),
    "empty": (b"", "(empty body)"),
    "null-message": (b'{"error": {"message": null, "type": "server_error"}}', "server_error"),
}


@pytest.mark.parametrize("shape", sorted(BODIES))
def test_error_bodies_in_every_servers_shape_keep_their_message(shape):
    raw, expected = BODIES[shape]
    assert error_detail(raw, ()) == expected


@pytest.mark.parametrize("outcome,expected", [("detail", "is not served here"), ("vllm-400", "does not exist")])
def test_a_wrong_model_is_reported_with_the_servers_words(outcome, expected):
    with FakeServer(faults=[outcome]) as srv:
        out = collect({"model": "hosted_vllm/nope", "api_base": srv.api_base, "timeout_s": 5}, [req(1)])
    assert expected in out["key-1"].error and "None" not in out["key-1"].error


def test_missing_credentials_are_a_configuration_error_not_retried(monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE"):
        monkeypatch.delenv(name, raising=False)
    from specdsl.backends.litellm.loader import import_litellm

    import_litellm()  # before the clock: importing litellm alone took over 10 s on a loaded machine
    with FakeServer() as srv:
        t0 = time.monotonic()
        out = collect({"model": "openai/fake", "api_base": srv.api_base, "transport": "litellm",
                       "retry_backoff_s": 2}, [req(1), req(2)])
        assert srv.request_count == 0
    assert time.monotonic() - t0 < 10
    for r in out.values():
        assert "no API key" in r.error and "OPENAI_API_KEY" in r.error and "HTTP 500" not in r.error
        assert "attempts" not in r.error  # never retried


def test_a_self_hosted_model_costs_unknown_not_zero(tmp_path):
    from specdsl import api
    from specdsl.views.plan import render_run_summary
    from rich.console import Console

    with FakeServer() as srv:
        (tmp_path / "rows.jsonl").write_text('{"id": "a", "q": "hi"}\n')
        (tmp_path / "spec.yaml").write_text(f"""specdsl: 1
name: unpriced
models:
  m: {{backend: litellm, model: hosted_vllm/m, api_base: "{srv.api_base}"}}
sources:
  rows: {{path: rows.jsonl}}
steps:
  - id: answers
    generate: {{from: rows, model: m, user: "{{{{ row.q }}}}"}}
""")
        result = api.run_plan(api.compile_spec(tmp_path / "spec.yaml"), progress=False)
    assert result.ok
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["totals"]["cost"] is None
    assert next(n for n in manifest["nodes"] if n["id"] == "answers")["cost"] is None
    console = Console(record=True, width=200)
    render_run_summary(result, console=console)
    table = console.export_text()
    assert "unknown" in table and "$0.0000" not in table
    report = (result.manifest_path.parent / "report.html").read_text()
    assert "unknown" in report


def test_fail_fast_journals_the_answers_in_flight_at_the_first_failure(tmp_path):
    from specdsl.errors import RunError
    from specdsl.execute.generation import run_requests
    from specdsl.execute.journal import RequestJournal

    with FakeServer(latency=0.5, fault_fn=lambda prompt, attempt: "400" if prompt == "prompt 0" else None) as srv:
        options = {"model": "hosted_vllm/fake", "api_base": srv.api_base, "concurrency": 4, "timeout_s": 5}
        with RequestJournal(tmp_path / "j.sqlite") as journal:
            with pytest.raises(RunError, match="row 0"):
                run_requests(LiteLLMBackend(), options, [req(i) for i in range(40)], journal, fail_fast=True)
            assert srv.request_count == 4  # nothing new was sent after the failure
            assert sorted(journal.keys()) == ["key-1", "key-2", "key-3"]  # the three in flight were kept
