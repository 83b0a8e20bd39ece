"""A fake OpenAI-compatible chat-completions server for tests and benchmarks.

Real HTTP on 127.0.0.1, so provider faults (429 with Retry-After, 5xx, hangs, auth failures) exercise
the real client stack (litellm, aiohttp, our retry loop) instead of mocks.

In-process use (tests)::

    with FakeServer(latency=0.05, faults=["429", "ok"], retry_after=1) as srv:
        options = {"model": "openai/fake", "api_base": srv.api_base, "api_key": "sk-test"}
        ...
        assert srv.attempts("prompt text") == 2

Standalone use (the end-to-end SIGKILL resume test runs ``specdsl run`` in a subprocess)::

    python -m tests.fakeserver --port 0 --latency 0.2 --log requests.jsonl

prints ``listening on http://127.0.0.1:PORT/v1`` once it accepts connections. ``GET /stats`` returns
the request counters as JSON.

Faults
------
``faults`` is a per-prompt script: attempt *i* (1-based) of a prompt gets outcome ``faults[i-1]``; once
the script is exhausted every further attempt is ``"ok"``. A prompt is the content of the last
message. Outcomes:

``ok``      a normal answer after ``latency`` seconds
``429``     Too Many Requests, with ``Retry-After: <retry_after>`` when ``retry_after`` is set
``500``/``502``/``503``  server errors
``400``     a bad request (clients must not retry it)
``401``     an authentication failure
``echo-auth[:N]``  a 400 whose error message quotes the request's Authorization header at character N
            of the message (default 290), as a careless provider or proxy might; for redaction tests
``echo-headers[:STATUS]``  an error (default 400; 401 for an auth failure) whose message quotes every
            request header, as a debugging proxy might; for redaction tests
``detail``  a 400 in FastAPI's shape, ``{"detail": "..."}`` (what ``transformers serve`` answers a wrong model)
``vllm-400`` a 400 in vLLM's shape, ``{"object": "error", "message": "...", "code": 400}``
``nonjson-auth``  a 200 whose body is not JSON and quotes the Authorization header (redaction tests)
``hang``    sleep ``hang_s`` seconds before answering (clients time out first)
``drop``    close the connection without a response

``fault_fn(prompt, attempt) -> outcome | None`` overrides the script when given (``None`` = use it).
``models``: what ``GET /v1/models`` lists (an OpenAI model list); None (the default) answers it 404, as a
server without that route does (the client's preflight then goes ahead); ``models_status`` makes it
answer that status instead (405, 500, ...). ``models_requests`` counts the GETs.
``api_key`` set: any request whose bearer token differs gets a 401 (like a provider with a bad key).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

Responder = Callable[[list[dict[str, Any]]], str]


def default_responder(messages: list[dict[str, Any]]) -> str:
    """Deterministic: the same messages always get the same answer, and the answer names the prompt."""
    last = messages[-1].get("content", "") if messages else ""
    if not isinstance(last, str):
        last = json.dumps(last, sort_keys=True)
    return f"echo: {last}"


def count_tokens(text: str) -> int:
    """Whitespace words stand in for tokens: deterministic, and easy to predict in assertions."""
    return len(text.split())


@dataclass
class RequestRecord:
    prompt: str
    attempt: int
    outcome: str
    t_start: float
    t_end: float = 0.0
    status: int = 0
    model: str = ""
    auth: str = ""  # the bearer token the client sent (tests check it is the resolved key)


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    log: list[RequestRecord] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0


class FakeServer:
    """An aiohttp.web server on its own event loop in a daemon thread; use as a context manager."""

    def __init__(self, *, latency: float = 0.0, responder: Responder | None = None,
                 faults: Sequence[str] = (), fault_fn: Callable[[str, int], str | None] | None = None,
                 retry_after: float | None = None, hang_s: float = 30.0, api_key: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, log_path: str | None = None,
                 keep_log: bool = True, models: Sequence[str] | None = None, models_status: int | None = None):
        self.latency = latency
        self.responder = responder or default_responder
        self.faults = list(faults)
        self.fault_fn = fault_fn
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.api_key = api_key
        self.host = host
        self.port = port
        self.log_path = log_path
        self.keep_log = keep_log  # the benchmark turns it off: 2,000 records are cheap, but why pay
        self.models = models
        self.models_status = models_status
        self.models_requests = 0
        self._state = _State()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._log_file = None

    # ---------------------------------------------------------------------------------------------
    # Inspection (thread-safe)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def requests(self) -> list[RequestRecord]:
        with self._state.lock:
            return list(self._state.log)

    @property
    def request_count(self) -> int:
        with self._state.lock:
            return sum(self._state.attempts.values())

    @property
    def max_in_flight(self) -> int:
        with self._state.lock:
            return self._state.max_in_flight

    def attempts(self, prompt: str) -> int:
        """How many requests this prompt (the last message's content) has received."""
        with self._state.lock:
            return self._state.attempts.get(prompt, 0)

    def attempts_by_prompt(self) -> dict[str, int]:
        with self._state.lock:
            return dict(self._state.attempts)

    def reset(self) -> None:
        with self._state.lock:
            self._state.log.clear()
            self._state.attempts.clear()
            self._state.in_flight = 0
            self._state.max_in_flight = 0

    # ---------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> "FakeServer":
        self._thread = threading.Thread(target=self._run, name="fakeserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("fake server did not start within 30 s")
        if self._startup_error is not None:
            raise RuntimeError(f"fake server failed to start: {self._startup_error}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            fut.result(10)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "FakeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Standalone mode: run in the calling thread until interrupted."""
        self.start()
        print(f"listening on {self.api_base}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # report to start() rather than dying silently in a thread
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _startup(self) -> None:
        from aiohttp import web

        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_post("/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/stats", self._handle_stats)
        # A large backlog: a benchmark opens 64+ connections at once.
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=1024, reuse_address=True)
        await site.start()
        self._runner = runner
        if self.port == 0:
            sockets = site._server.sockets  # the OS picked a free port; read it back
            self.port = sockets[0].getsockname()[1]
        if self.log_path:
            self._log_file = open(self.log_path, "a", encoding="utf-8")

    async def _shutdown(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---------------------------------------------------------------------------------------------
    # Handlers

    def _outcome(self, prompt: str, attempt: int) -> str:
        if self.fault_fn is not None:
            chosen = self.fault_fn(prompt, attempt)
            if chosen is not None:
                return chosen
        if attempt <= len(self.faults):
            return self.faults[attempt - 1]
        return "ok"

    async def _handle_models(self, request):
        from aiohttp import web

        with self._state.lock:
            self.models_requests += 1
        if self.models_status is not None:
            return web.json_response({"error": {"message": "no model list here"}}, status=self.models_status)
        if self.models is None:
            return web.json_response({"detail": "Not Found"}, status=404)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"}
                                                             for m in self.models]})

    async def _handle_stats(self, request):
        from aiohttp import web

        with self._state.lock:
            body = {"requests": sum(self._state.attempts.values()),
                    "attempts": dict(self._state.attempts),
                    "max_in_flight": self._state.max_in_flight}
        return web.json_response(body)

    async def _handle_chat(self, request):
        from aiohttp import web

        t0 = time.monotonic()
        try:
            body = await request.json()
        except Exception:
            return web.json_response({"error": {"message": "invalid JSON", "type": "invalid_request_error"}},
                                     status=400)
        messages = body.get("messages") or []
        prompt = messages[-1].get("content", "") if messages else ""
        if not isinstance(prompt, str):
            prompt = json.dumps(prompt, sort_keys=True)
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else auth
        st = self._state
        with st.lock:
            attempt = st.attempts.get(prompt, 0) + 1
            st.attempts[prompt] = attempt
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
        outcome = self._outcome(prompt, attempt)
        if self.api_key is not None and token != self.api_key:
            outcome = "401"
        rec = RequestRecord(prompt=prompt, attempt=attempt, outcome=outcome, t_start=t0,
                            model=str(body.get("model", "")), auth=token)
        try:
            resp = await self._respond(outcome, body, messages, request)
            rec.status = resp.status if resp is not None else 0
            return resp
        finally:
            rec.t_end = time.monotonic()
            with st.lock:
                st.in_flight -= 1
                if self.keep_log:
                    st.log.append(rec)
                if self._log_file is not None:
                    self._log_file.write(json.dumps(rec.__dict__) + "\n")
                    self._log_file.flush()

    async def _respond(self, outcome: str, body: dict, messages: list, request):
        from aiohttp import web

        def error(status: int, message: str, etype: str, headers=None):
            return web.json_response({"error": {"message": message, "type": etype, "code": str(status)}},
                                     status=status, headers=headers)

        if outcome == "429":
            headers = {"Retry-After": f"{self.retry_after:g}"} if self.retry_after is not None else None
            return error(429, "Rate limit reached, slow down", "rate_limit_error", headers)
        if outcome in ("500", "502", "503"):
            await asyncio.sleep(self.latency / 4)
            return error(int(outcome), "The server had an error while processing your request",
                         "server_error")
        if outcome == "400":
            return error(400, "Invalid request: bad parameter", "invalid_request_error")
        if outcome == "401":
            return error(401, "Incorrect API key provided", "invalid_request_error")
        if outcome.startswith("echo-auth"):
            _, _, at = outcome.partition(":")
            lead = "Invalid request: the headers were not understood. "
            lead = (lead * (int(at or 290) // len(lead) + 1))[: int(at or 290)]
            quoted = request.headers.get("Authorization", "")
            return error(400, f"{lead}{quoted} (end of the headers)", "invalid_request_error")
        if outcome.startswith("echo-headers"):
            _, _, code = outcome.partition(":")
            quoted = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
            return error(int(code or 400), f"the request was refused; it carried {quoted}",
                         "invalid_request_error")
        if outcome == "detail":
            return web.json_response({"detail": f"The model {body.get('model')!r} is not served here"},
                                     status=400)
        if outcome == "vllm-400":
            return web.json_response({"object": "error", "message": f"The model `{body.get('model')}` does "
                                      "not exist.", "type": "NotFoundError", "param": None, "code": 404},
                                     status=404)
        if outcome == "nonjson-auth":
            quoted = request.headers.get("Authorization", "")
            return web.Response(text=f"<html>proxy debug: Authorization: {quoted}</html>", status=200)
        if outcome == "drop":
            # Close the socket with no response at all: the client sees a disconnect, not a 5xx.
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("dropped by fake server")
        if outcome == "hang":
            # Wakes early when the server stops, so a test's teardown never waits out a hang.
            try:
                await asyncio.wait_for(self._stopping.wait(), self.hang_s)
            except asyncio.TimeoutError:
                pass
        elif self.latency:
            await asyncio.sleep(self.latency)
        text = self.responder(messages)
        prompt_tokens = sum(count_tokens(m.get("content", "")) for m in messages
                            if isinstance(m.get("content", ""), str))
        completion_tokens = count_tokens(text)
        return web.json_response({
            "id": f"chatcmpl-fake-{int(time.time() * 1e6)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fakeserver", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed at start)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--faults", default="", help="per-prompt outcome script, e.g. 429,500,ok")
    p.add_argument("--retry-after", type=float, default=None)
    p.add_argument("--hang-s", type=float, default=30.0)
    p.add_argument("--api-key", default=None, help="require this bearer token (else 401)")
    p.add_argument("--log", default=None, help="append one JSON line per request to this file")
    p.add_argument("--models", default=None, help="comma-separated ids GET /v1/models lists (default: 404)")
    args = p.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    srv = FakeServer(latency=args.latency, faults=faults, retry_after=args.retry_after,
                     hang_s=args.hang_s, api_key=args.api_key, host=args.host, port=args.port,
                     log_path=args.log, keep_log=False,
                     models=None if args.models is None else [m for m in args.models.split(",") if m])
    srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
