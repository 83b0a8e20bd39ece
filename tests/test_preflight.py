"""The preflight (``GET {api_base}/models`` before a batch) against tests/fakeserver.py: a dead server fails
the batch at once, a model the server does not list is tried with one request before the rest, and a
server without a model list is no error. Real HTTP, nothing mocked."""

from __future__ import annotations

import socket
import time

import pytest

from specdsl.backends.litellm.backend import LiteLLMBackend
from specdsl.contract.hookspecs import GenRequest, GenResult
from tests.fakeserver import FakeServer

# One self-hosted model (no litellm), and litellm's two ways to an OpenAI-compatible server.
ROUTES = [("hosted_vllm", {}), ("openai", {"transport": "direct"}), ("openai", {"transport": "litellm"})]


def req(i) -> GenRequest:
    return GenRequest(key=f"key-{i}", messages=({"role": "user", "content": f"prompt {i}"},), params={},
                      row_id=str(i))


def collect(options: dict, n: int) -> dict[str, GenResult]:
    out: dict[str, GenResult] = {}
    LiteLLMBackend().generate(options, [req(i) for i in range(n)], lambda r: out.__setitem__(r.key, r))
    assert len(out) == n
    return out


def options(srv_or_base, model: str, **extra) -> dict:
    base = srv_or_base if isinstance(srv_or_base, str) else srv_or_base.api_base
    return {"model": model, "api_base": base, "api_key": "sk-preflight", "timeout_s": 10,
            "retry_backoff_s": 0.01, **extra}


@pytest.mark.parametrize("prefix,extra", ROUTES, ids=["hosted_vllm", "openai-direct", "openai-litellm"])
def test_a_model_the_server_does_not_serve_costs_one_request_and_names_the_served_ones(prefix, extra):
    with FakeServer(models=["served-a", "served-b"], faults=["vllm-400"]) as srv:
        out = collect(options(srv, f"{prefix}/nope", **extra), 40)
        assert srv.models_requests == 1 and srv.request_count == 1  # the rest were never sent
    messages = {r.error for r in out.values()}
    assert len(messages) == 1, messages
    (message,) = messages
    assert "does not list 'nope'" in message and "'served-a', 'served-b'" in message, message
    assert "does not exist" in message  # the server's own words for the one request it refused
    assert f"model: {prefix}/served-a" in message


@pytest.mark.parametrize("prefix,extra", ROUTES, ids=["hosted_vllm", "openai-direct", "openai-litellm"])
def test_a_listed_model_goes_ahead_after_one_get(prefix, extra):
    with FakeServer(models=["fake"]) as srv:
        out = collect(options(srv, f"{prefix}/fake", **extra), 20)
        assert srv.models_requests == 1 and srv.request_count == 20
    assert all(r.ok for r in out.values())


def test_an_unlisted_model_that_the_server_loads_on_demand_still_works():
    """`transformers serve` without a pinned model lists only what it holds: the first request loads it."""
    with FakeServer(models=["something-else"]) as srv:
        out = collect(options(srv, "hosted_vllm//models/SmolLM2-135M-Instruct"), 20)
        assert srv.request_count == 20
        assert {r.model for r in srv.requests} == {"/models/SmolLM2-135M-Instruct"}
    assert all(r.ok for r in out.values())


@pytest.mark.parametrize("status", [None, 401, 405, 500])
def test_a_server_without_a_model_list_is_no_error(status):
    with FakeServer(models_status=status) as srv:  # None: the route does not exist (404)
        out = collect(options(srv, "hosted_vllm/anything"), 10)
        assert srv.models_requests == 1 and srv.request_count == 10
    assert all(r.ok for r in out.values())


def test_a_dead_server_fails_the_batch_at_once_with_one_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket is closed
    t0 = time.monotonic()
    out = collect(options(f"http://127.0.0.1:{port}/v1", "hosted_vllm/m", retry_backoff_s=5), 500)
    assert time.monotonic() - t0 < 5  # no request retried with backoff: the breaker's run is not needed
    (message,) = {r.error for r in out.values()}
    assert "cannot reach" in message and f"127.0.0.1:{port}/v1/models" in message, message
    assert "is the server running" in message


def test_preflight_false_sends_no_get_and_every_request():
    with FakeServer(models=["served-a"], faults=["vllm-400"]) as srv:
        out = collect(options(srv, "hosted_vllm/nope", preflight=False), 10)
        assert srv.models_requests == 0 and srv.request_count == 10
    assert all("does not exist" in r.error for r in out.values())


def test_preflight_is_a_documented_model_option(tmp_path):
    from specdsl import api
    from specdsl.errors import SpecErrors

    (tmp_path / "rows.jsonl").write_text('{"id": "a", "q": "hi"}\n')
    spec = """specdsl: 1
name: pf
models:
  m: {backend: litellm, model: hosted_vllm/m, api_base: "http://127.0.0.1:9/v1", preflight: VALUE}
sources:
  rows: {path: rows.jsonl}
steps:
  - id: answers
    generate: {from: rows, model: m, user: "{{ row.q }}"}
"""
    (tmp_path / "spec.yaml").write_text(spec.replace("VALUE", "false"))
    api.compile_spec(tmp_path / "spec.yaml")
    (tmp_path / "spec.yaml").write_text(spec.replace("VALUE", "sometimes"))
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(tmp_path / "spec.yaml")
    assert info.value.codes == ["S210"] or info.value.codes == ["S102"], info.value.render()
