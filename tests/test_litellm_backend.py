"""LiteLLMBackend against a real HTTP server (tests/fakeserver.py): no mocks of litellm or of specdsl.

Most behaviour is checked on both transports: ``direct`` (our aiohttp session, litellm for parameter
mapping and prices) and ``litellm`` (litellm.acompletion per request).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import jsonschema
import pytest

from specdsl.backends.litellm.backend import LiteLLMBackend
from specdsl.contract.hookspecs import GenerationBackend, GenRequest, GenResult
from tests.conftest import ROOT
from tests.fakeserver import FakeServer

TRANSPORTS = ["direct", "litellm"]
SECRET = "sk-test-Zq81secretvalue"


def req(i: int | str, **params) -> GenRequest:
    return GenRequest(key=f"key-{i}", messages=({"role": "user", "content": f"prompt {i}"},),
                      params=params, row_id=str(i))


def opts(server: FakeServer, transport: str, **extra) -> dict:
    o = {"model": "openai/fake", "api_base": server.api_base, "api_key": SECRET,
         "_api_key_env": "FAKE_PROVIDER_KEY", "transport": transport, "retry_backoff_s": 0.02,
         "timeout_s": 5}
    o.update(extra)
    return o


def collect(backend: LiteLLMBackend, options: dict, requests: list[GenRequest]) -> dict[str, GenResult]:
    out: dict[str, GenResult] = {}
    seen_threads = set()

    def on_result(r: GenResult) -> None:
        assert r.key not in out, "on_result called twice for one key"
        seen_threads.add(threading.get_ident())
        out[r.key] = r

    backend.generate(options, requests, on_result)
    assert len(seen_threads) <= 1, "on_result must be called from one thread at a time"
    return out


@pytest.fixture(scope="module")
def backend() -> LiteLLMBackend:
    return LiteLLMBackend()


# --------------------------------------------------------------------------------------------------
# Contract, schema, identity, price
# --------------------------------------------------------------------------------------------------


def test_import_is_cheap():
    code = ("import sys, specdsl.backends.litellm.backend as m; "
            "heavy = [n for n in ('litellm', 'aiohttp', 'openai', 'httpx') if n in sys.modules]; "
            "assert not heavy, heavy; assert m.LiteLLMBackend.name == 'litellm'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_satisfies_protocol(backend):
    assert isinstance(backend, GenerationBackend)
    assert backend.name == "litellm" and isinstance(backend.version, str)


def test_options_schema(backend):
    schema = backend.options_schema
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    assert schema["additionalProperties"] is False
    assert v.is_valid({"api_base": "http://localhost:8000/v1", "api_key": "${env:OPENAI_API_KEY}",
                       "temperature": 0.7, "top_p": 0.9, "max_tokens": 256, "timeout_s": 30,
                       "max_retries": 3, "concurrency": 32, "rpm": 500, "tpm": 200000,
                       "extra_headers": {"X-Team": "data"}, "transport": "auto"})
    assert not v.is_valid({"api_key": "sk-live-inline-key"})  # secrets must be ${env:NAME}
    assert not v.is_valid({"api_key": "${env:}"})
    assert not v.is_valid({"max_new_tokens": 5})               # unknown option
    assert not v.is_valid({"concurrency": 0})
    assert not v.is_valid({"transport": "carrier-pigeon"})
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"option {name} is undocumented"


def test_identity_never_has_secrets_or_speed_knobs(backend):
    o = {"model": "openai/gpt-4o-mini", "api_key": SECRET, "_api_key_env": "K", "temperature": 0.2,
         "concurrency": 8, "rpm": 10, "timeout_s": 3, "max_retries": 1, "transport": "litellm",
         "api_base": "http://h:1/v1/"}
    ident = backend.identity(o)
    assert SECRET not in repr(ident) and "K" not in ident.values()
    assert ident["model"] == "openai/gpt-4o-mini" and ident["temperature"] == 0.2
    assert ident["api_base"] == "http://h:1/v1" and ident["max_tokens"] == 1024
    # Operational options only change speed, never answers: same identity.
    assert ident == backend.identity({**o, "concurrency": 64, "rpm": None, "transport": "direct"})
    assert ident != backend.identity({**o, "temperature": 0.3})


def test_price_from_local_cost_map(backend):
    p = backend.price({"model": "openai/gpt-4o-mini"}, 1_000_000, 1_000_000)
    assert p is not None and 0 < p < 100
    assert backend.price({"model": "openai/surely-not-a-real-model-xyz"}, 10, 10) is None


def test_auto_transport_choice(backend):
    assert backend.transport_for({"model": "openai/fake", "api_base": "http://x/v1"}) == "direct"
    assert backend.transport_for({"model": "hosted_vllm/m", "api_base": "http://x/v1"}) == "direct"
    assert backend.transport_for({"model": "anthropic/claude-3-5-haiku-20241022"}) == "litellm"
    assert backend.transport_for({"model": "openai/fake", "transport": "litellm"}) == "litellm"


def test_auto_sends_provider_apis_through_litellm(backend, monkeypatch):
    """`auto` takes the direct path only to a self-hosted server: a provider's own API goes through litellm
    (its headers, callbacks and parameter rules), even for an OpenAI-wire provider."""
    for env in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "HOSTED_VLLM_API_BASE"):
        monkeypatch.delenv(env, raising=False)
    assert backend.transport_for({"model": "openai/gpt-4o-mini"}) == "litellm"
    assert backend.transport_for({"model": "openai/gpt-4o-mini", "api_base": "https://api.openai.com/v1"}) == "litellm"
    assert backend.transport_for({"model": "custom_openai/m", "api_base": "http://127.0.0.1:8000/v1"}) == "direct"
    # An explicit `transport: direct` is still honoured for OpenAI's API.
    assert backend.transport_for({"model": "openai/gpt-4o-mini", "transport": "direct"}) == "direct"
    # The provider's base-URL variable names a self-hosted server as well as the option does.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://gateway.internal:4000/v1")
    assert backend.transport_for({"model": "openai/gpt-4o-mini"}) == "direct"


# --------------------------------------------------------------------------------------------------
# Behaviour over HTTP, on both transports
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_answers_usage_and_params(backend, transport):
    with FakeServer(latency=0.01, responder=lambda m: "ANSWER " + m[-1]["content"].upper()) as srv:
        requests = [req(i) for i in range(6)] + [req("t", temperature=0.5, max_tokens=7, seed=3)]
        out = collect(backend, opts(srv, transport, temperature=0.1), requests)
        assert set(out) == {r.key for r in requests}
        r0 = out["key-0"]
        assert r0.ok and r0.text == "ANSWER PROMPT 0"
        assert (r0.input_tokens, r0.output_tokens) == (2, 3)  # the fake server counts words
        assert r0.cost == 0.0 and r0.latency_s > 0
        assert srv.request_count == len(requests)
        assert all(rec.auth == SECRET and rec.model == "fake" for rec in srv.requests)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_429_retry_after_is_honoured(backend, transport):
    with FakeServer(faults=["429", "429"], retry_after=0.6) as srv:
        out = collect(backend, opts(srv, transport), [req(1)])
        assert out["key-1"].ok
        log = sorted((r for r in srv.requests if r.prompt == "prompt 1"), key=lambda r: r.t_start)
        assert [r.outcome for r in log] == ["429", "429", "ok"]
        gaps = [b.t_start - a.t_end for a, b in zip(log, log[1:])]
        assert all(g >= 0.55 for g in gaps), gaps  # retry_backoff_s is 0.02: only Retry-After explains this


def test_retry_after_pauses_the_whole_batch(backend):
    # A 429 with Retry-After throttles the key, not one request: nobody starts a new attempt until then.
    fault = (lambda p, a: "429" if p == "prompt 0" and a == 1 else None)
    with FakeServer(latency=0.05, fault_fn=fault, retry_after=0.5) as srv:
        out = collect(backend, opts(srv, "direct", concurrency=3), [req(i) for i in range(12)])
        assert all(r.ok for r in out.values())
        t429 = next(r.t_end for r in srv.requests if r.outcome == "429")
        starts = [r.t_start for r in srv.requests if r.outcome == "ok"]
        assert not [t for t in starts if t429 + 0.02 < t < t429 + 0.45]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_500_and_dropped_connections_are_retried(backend, transport):
    with FakeServer(faults=["500", "503", "drop"]) as srv:
        out = collect(backend, opts(srv, transport), [req(1), req(2)])
        assert all(r.ok for r in out.values()), out
        assert srv.attempts("prompt 1") == 4 and srv.attempts("prompt 2") == 4


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retries_are_bounded(backend, transport):
    with FakeServer(faults=["500"] * 10) as srv:
        out = collect(backend, opts(srv, transport, max_retries=2), [req(1)])
        r = out["key-1"]
        assert not r.ok and r.text is None
        assert "500" in r.error and "3 attempts" in r.error
        assert srv.attempts("prompt 1") == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timeouts_are_retried_then_fail(backend, transport):
    with FakeServer(faults=["hang"] * 5, hang_s=3) as srv:
        t = time.monotonic()
        out = collect(backend, opts(srv, transport, timeout_s=0.3, max_retries=1), [req(1)])
        r = out["key-1"]
        assert not r.ok and "timed out" in r.error and "2 attempts" in r.error
        assert srv.attempts("prompt 1") == 2
        assert time.monotonic() - t < 2.5  # each attempt gave up at ~0.3 s, not at the 3 s hang


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timeout_then_success(backend, transport):
    with FakeServer(faults=["hang"], hang_s=3) as srv:
        out = collect(backend, opts(srv, transport, timeout_s=0.3), [req(1)])
        assert out["key-1"].ok and srv.attempts("prompt 1") == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_400_is_not_retried(backend, transport):
    with FakeServer(faults=["400"]) as srv:
        out = collect(backend, opts(srv, transport), [req(1)])
        assert not out["key-1"].ok and srv.attempts("prompt 1") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_401_names_the_env_var_and_never_the_key(backend, transport, capfd, caplog):
    with FakeServer(api_key="the-right-key") as srv:
        requests = [req(i) for i in range(40)]
        out = collect(backend, opts(srv, transport, concurrency=2), requests)
        errors = {r.error for r in out.values()}
        assert all(not r.ok for r in out.values())
        msg = out["key-0"].error
        assert "FAKE_PROVIDER_KEY" in msg and "401" in msg and "authentication failed" in msg
        # Not retried, and once the key is known bad the rest of the batch is not sent at all.
        assert srv.request_count <= 2
        captured = capfd.readouterr()
        for text in [*errors, captured.out, captured.err, caplog.text]:
            assert SECRET not in text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrency_bound(backend, transport):
    with FakeServer(latency=0.15) as srv:
        out = collect(backend, opts(srv, transport, concurrency=5), [req(i) for i in range(30)])
        assert all(r.ok for r in out.values())
        assert srv.max_in_flight == 5


def test_rpm_limit(backend):
    with FakeServer() as srv:
        n, rpm = 16, 480  # 8 per second, at most one second's worth (8) in a burst
        t = time.monotonic()
        out = collect(backend, opts(srv, "direct", rpm=rpm, concurrency=16), [req(i) for i in range(n)])
        elapsed = time.monotonic() - t
        assert all(r.ok for r in out.values())
        starts = sorted(r.t_start for r in srv.requests)
        assert elapsed >= (n - 8) / 8 * 0.9
        for i, s in enumerate(starts):  # never more than burst + rate * window in any window
            in_window = sum(1 for x in starts[i:] if x - s < 1.0)
            assert in_window <= 8 + 8 + 1, in_window


def test_tpm_limit(backend):
    # Answers of 100 words = 100 tokens: the reservation is corrected by little after each response.
    with FakeServer(responder=lambda m: "word " * 100) as srv:
        # Each request reserves ceil(chars/4) + max_tokens = 4 + 100 tokens; 12,000 tpm = 200/s with
        # one second (200 tokens) of burst: 6 requests need 624 - 200 = 424 tokens more, ~2.1 s.
        t = time.monotonic()
        out = collect(backend, opts(srv, "direct", tpm=12000, max_tokens=100, concurrency=8),
                      [req(i) for i in range(6)])
        assert all(r.ok for r in out.values())
        assert time.monotonic() - t >= 1.8


# --------------------------------------------------------------------------------------------------
# Limits an executor shares across processes (make_limiter / with_limiter)
# --------------------------------------------------------------------------------------------------


def test_make_limiter_holds_only_the_limits_the_options_set(backend):
    from specdsl.backends.litellm.backend import RequestLimiter
    from specdsl.contract.hookspecs import LimitedBackend, Limiter

    assert isinstance(backend, LimitedBackend)
    base = {"model": "openai/fake", "api_base": "http://127.0.0.1:9/v1"}
    assert backend.make_limiter(base) is None  # nothing to share: an executor starts nothing
    limiter = backend.make_limiter({**base, "rpm": 120})
    assert isinstance(limiter, RequestLimiter) and isinstance(limiter, Limiter)
    # the default concurrency (16) stays per process; a concurrency the model sets is shared
    assert (limiter.concurrency, limiter.rpm, limiter.tpm) == (None, 120, None)
    limiter = backend.make_limiter({**base, "concurrency": 4, "tpm": 9000})
    assert (limiter.concurrency, limiter.rpm, limiter.tpm) == (4, None, 9000)


class RecordingLimiter:
    """A Limiter (the plugin contract) that admits through litellm's own RequestLimiter and records
    what the backend tells it."""

    def __init__(self, concurrency):
        from specdsl.backends.litellm.backend import RequestLimiter

        self.inner = RequestLimiter(concurrency, None, None)
        self.acquired: list[int] = []
        self.released: list[tuple[int, int]] = []
        self.paused: list[float] = []

    async def acquire(self, tokens):
        await self.inner.acquire(tokens)
        self.acquired.append(tokens)

    def release(self, reserved, used):
        self.released.append((reserved, used))
        self.inner.release(reserved, used)

    def pause(self, seconds):
        self.paused.append(seconds)
        self.inner.pause(seconds)


def test_an_injected_limiter_admits_every_attempt(backend):
    # The backend's own concurrency is 8; the injected limiter (an executor's shared one) allows 2.
    fault = (lambda p, a: {("prompt 0", 1): "500", ("prompt 1", 1): "400"}.get((p, a)))
    with FakeServer(latency=0.1, fault_fn=fault) as srv:
        limiter = RecordingLimiter(2)
        limited = backend.with_limiter(limiter)
        assert limited is not backend and backend._limiter is None  # the registered backend is unchanged
        out = collect(limited, opts(srv, "direct", concurrency=8), [req(i) for i in range(10)])
        assert srv.max_in_flight == 2
    assert not out["key-1"].ok and all(out[f"key-{i}"].ok for i in range(10) if i != 1)
    assert len(limiter.acquired) == len(limiter.released) == srv.request_count == 11
    reserved = limiter.acquired[0]
    assert reserved == 4 + 1024  # ceil((len("prompt 0") + 8) / 4) + the default max_tokens
    released = sorted(limiter.released, key=lambda r: r[1])
    # a 400 used nothing, a 500 keeps its reservation, an answer uses what the server reported (2 + 3 words)
    assert released == [(reserved, 0)] + [(reserved, 5)] * 9 + [(reserved, reserved)]


def test_an_injected_limiter_hears_retry_after(backend):
    with FakeServer(faults=["429"], retry_after=0.3) as srv:
        limiter = RecordingLimiter(4)
        out = collect(backend.with_limiter(limiter), opts(srv, "direct"), [req(1)])
    assert out["key-1"].ok and limiter.paused == [0.3]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_on_result_exception_stops_the_batch(backend, transport):
    with FakeServer(latency=0.05) as srv:
        got: list[GenResult] = []

        def on_result(r: GenResult) -> None:
            got.append(r)
            if len(got) == 3:
                raise KeyError("stop")

        with pytest.raises(KeyError):
            backend.generate(opts(srv, transport, concurrency=2), [req(i) for i in range(50)], on_result)
        assert len(got) == 3
        time.sleep(0.2)
        assert srv.request_count <= 6  # nothing was sent after the failure


def test_generate_from_a_thread_and_from_a_running_loop(backend):
    with FakeServer() as srv:
        results: dict = {}
        th = threading.Thread(target=lambda: results.update(collect(backend, opts(srv, "direct"),
                                                                    [req(1), req(2)])))
        th.start()
        th.join(30)
        assert set(results) == {"key-1", "key-2"}

        async def inside_loop() -> dict:
            return collect(backend, opts(srv, "litellm"), [req(3)])

        assert asyncio.run(inside_loop())["key-3"].ok


def test_unsupported_param_is_a_clear_error(backend):
    with FakeServer() as srv:
        out = collect(backend, opts(srv, "direct", model="openai/o3-mini"), [req(1, top_p=0.5)])
        assert "top_p" in out["key-1"].error and srv.request_count == 0
        out = collect(backend, opts(srv, "direct", model="openai/o3-mini", drop_params=True),
                      [req(2, top_p=0.5)])
        assert out["key-2"].ok


def test_cost_from_local_cost_map(backend):
    with FakeServer() as srv:
        for transport in TRANSPORTS:
            out = collect(backend, opts(srv, transport, model="openai/gpt-4o-mini"), [req(transport)])
            r = out[f"key-{transport}"]
            assert r.ok and r.cost == pytest.approx(
                backend.price({"model": "openai/gpt-4o-mini"}, r.input_tokens, r.output_tokens))
            assert r.cost > 0


# -- self-hosted OpenAI-compatible servers: no litellm import ---------------------------------------------


@pytest.mark.parametrize("prefix", ["hosted_vllm", "openai"])
def test_self_hosted_server_answers_without_importing_litellm(tmp_path, prefix):
    """`hosted_vllm/` (or `openai/` with a name litellm does not know) at an api_base needs nothing litellm
    computes; the run must not pay its import."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, json\n"
        "from tests.fakeserver import FakeServer\n"
        "from specdsl.backends.litellm.backend import LiteLLMBackend\n"
        "from specdsl.contract.hookspecs import GenRequest\n"
        "out = {}\n"
        "with FakeServer(faults=['429', 'ok'], retry_after=0.05) as srv:\n"
        "    reqs = [GenRequest(key=f'k{i}', messages=({'role': 'user', 'content': f'p{i}'},),\n"
        "                       params={'max_tokens': 8, 'seed': i}) for i in range(3)]\n"
        f"    LiteLLMBackend().generate({{'model': '{prefix}/my-model', 'api_base': srv.api_base,\n"
        "                               'retry_backoff_s': 0.01}, reqs, lambda r: out.update({r.key: r}))\n"
        "    models = sorted({r.model for r in srv.requests})\n"
        "print(json.dumps({'texts': {k: r.text for k, r in out.items()}, 'cost': [r.cost for r in out.values()],\n"
        "                  'models': models, 'litellm': 'litellm' in sys.modules}))\n")
    from tests.conftest import ROOT

    # The script lives outside the checkout: put the checkout first on its path for `tests.fakeserver`.
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=str(ROOT),
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json as _json

    result = _json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["texts"] == {f"k{i}": f"echo: p{i}" for i in range(3)}  # 429s were retried
    assert result["models"] == ["my-model"]  # the provider prefix is not sent
    assert result["cost"] == [0.0, 0.0, 0.0]  # unknown to the cost map: no price, not a made-up one
    assert result["litellm"] is False


def test_openai_models_behind_a_gateway_still_get_litellm_parameter_mapping():
    """A custom api_base in front of OpenAI's own models keeps litellm's per-model parameter rules."""
    from specdsl.backends.litellm.options import Settings as _Settings
    from specdsl.backends.litellm.transports import self_hosted_model as _self_hosted

    gateway = _Settings.from_options({"model": "openai/o3-mini", "api_base": "http://gateway/v1"})
    assert _self_hosted(gateway) is None
    for known in ("gpt-4o-mini", "o1", "my-gpt-5-finetune", "ft:gpt-4o-mini:org::abc"):
        assert _self_hosted(_Settings.from_options({"model": f"openai/{known}", "api_base": "http://gw/v1"})) is None
    # A server's own model behind an OpenAI-compatible endpoint: litellm would send its parameters unchanged.
    own = _Settings.from_options({"model": "openai/meta-llama/Llama-3.1-8B-Instruct", "api_base": "http://gw/v1"})
    assert _self_hosted(own) == "meta-llama/Llama-3.1-8B-Instruct"
    openai_itself = _Settings.from_options({"model": "openai/my-model", "api_base": "https://api.openai.com/v1"})
    assert _self_hosted(openai_itself) is None
    dropping = _Settings.from_options({"model": "openai/my-model", "api_base": "http://gw/v1", "drop_params": True})
    assert _self_hosted(dropping) is None
    vllm = _Settings.from_options({"model": "hosted_vllm/llama", "api_base": "http://gpu-box:8000/v1"})
    assert _self_hosted(vllm) == "llama"
    forced = _Settings.from_options({"model": "hosted_vllm/llama", "api_base": "http://gpu-box:8000/v1",
                                     "transport": "litellm"})
    assert _self_hosted(forced) is None


def test_openai_model_at_a_server_takes_the_key_from_openai_api_key(backend, monkeypatch):
    """Without `api_key`, `openai/` at a server of one's own sends OPENAI_API_KEY, as litellm would, and a
    rejected key is reported by that variable's name, never by its value."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeServer(api_key=SECRET) as srv:
        out = collect(backend, {"model": "openai/my-model", "api_base": srv.api_base, "timeout_s": 5}, [req(1)])
        assert out["key-1"].ok and srv.requests[0].auth == SECRET
    monkeypatch.setenv("OPENAI_API_KEY", SECRET + "-wrong")
    with FakeServer(api_key=SECRET) as srv:
        out = collect(backend, {"model": "openai/my-model", "api_base": srv.api_base, "timeout_s": 5}, [req(2)])
    error = out["key-2"].error
    assert "OPENAI_API_KEY" in error and SECRET not in error


# --------------------------------------------------------------------------------------------------
# Secrets in provider error bodies: redacted before a message is cut to length
# --------------------------------------------------------------------------------------------------


def _pieces(secret: str, n: int = 8) -> list[str]:
    return [secret[i:i + n] for i in range(len(secret) - n + 1)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_key_echoed_across_the_cut_of_an_error_body_is_never_printed_in_part(backend, transport):
    """A provider quoting the Authorization header where the error message is cut to length: the key
    is redacted first, so no piece of it survives the cut."""
    # The key lands at every offset around the 300-character cut (the litellm transport's messages
    # carry a prefix of their own, so a wide range of offsets covers its cut too).
    offsets = list(range(230, 310, 3))

    def fault(prompt: str, attempt: int) -> str:
        return f"echo-auth:{offsets[int(prompt.split()[-1])]}"

    with FakeServer(fault_fn=fault) as srv:
        out = collect(backend, opts(srv, transport), [req(i) for i in range(len(offsets))])
        assert all(r.auth == SECRET for r in srv.requests)  # the server did see (and echo) the key
    for r in out.values():
        assert not r.ok and "Invalid request" in r.error
        leaked = [p for p in _pieces(SECRET) if p in r.error]
        assert not leaked, (r.error, leaked)


def test_a_header_secret_from_a_reference_is_redacted_from_error_bodies(backend, monkeypatch):
    """extra_headers: {Authorization: ${env:...}} -- resolved like any secret, and kept out of errors."""
    from specdsl import secrets

    monkeypatch.setenv("FAKE_AUTH_HEADER", f"Bearer {SECRET}")
    with FakeServer(faults=["echo-auth:280"]) as srv:
        options = {"model": "openai/fake", "api_base": srv.api_base, "transport": "direct", "timeout_s": 5,
                   "extra_headers": {"Authorization": "${env:FAKE_AUTH_HEADER}"}}
        out = collect(backend, secrets.resolve(options, model="teacher"), [req(1)])
    error = out["key-1"].error
    assert "400" in error and not [p for p in _pieces(SECRET) if p in error], error


def test_direct_request_body_is_the_json_of_model_messages_and_parameters():
    """The direct transport encodes the constant part of its body once per parameter set: the bytes are
    still exactly json.dumps of the whole body (typed: 0, 0.0 and False are different parameter sets)."""
    from specdsl.backends.litellm.options import Settings as _Settings
    from specdsl.backends.litellm.transports import DirectTransport, send_as_is

    s = _Settings.from_options({"model": "hosted_vllm/m", "api_base": "http://x/v1"})
    transport = DirectTransport([], s, "m/é", "http://x/v1/chat/completions", None, send_as_is)
    messages = ({"role": "system", "content": 'é "quoted"\n'}, {"role": "user", "content": "日本"})
    for params in ({"max_tokens": 64, "seed": 0}, {}, {"stop": ["a"], "temperature": 0.5}, {"temperature": 0},
                   {"temperature": 0.0}, {"temperature": False}, {"max_tokens": None}, {"model": "other"}):
        for _ in range(2):  # the second time from the remembered encoding
            expected = json.dumps({"model": "m/é", "messages": [dict(m) for m in messages], **send_as_is(params)},
                                  ensure_ascii=False).encode("utf-8")
            assert transport._body(GenRequest(key="k", messages=messages), params) == expected
