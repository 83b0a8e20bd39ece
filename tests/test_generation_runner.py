"""run_requests: dedupe, resume from the journal (also after SIGKILL), progress, fail_fast.

Real HTTP against tests/fakeserver.py through LiteLLMBackend; a few runner edge cases use small
backends defined here, as third-party plugins would be.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from specdsl.backends.litellm.backend import LiteLLMBackend
from specdsl.errors import RunError
from specdsl.execute.generation import NO_RESULT, GenerationProgress, run_requests
from specdsl.execute.journal import RequestJournal
from specdsl.contract.hookspecs import GenRequest, GenResult, request_key
from tests.conftest import ROOT
from tests.fakeserver import FakeServer


def make_requests(backend, options, n: int, start: int = 0) -> list[GenRequest]:
    ident = backend.identity(options)
    out = []
    for i in range(start, start + n):
        msgs = ({"role": "user", "content": f"question {i}"},)
        out.append(GenRequest(key=request_key(ident, msgs, {}), messages=msgs, row_id=f"row{i}"))
    return out


def options(srv: FakeServer, **extra) -> dict:
    return {"model": "openai/fake", "api_base": srv.api_base, "api_key": "sk-runner",
            "_api_key_env": "RUNNER_KEY", "retry_backoff_s": 0.01, "concurrency": 8, **extra}


@pytest.fixture
def journal(tmp_path):
    with RequestJournal(tmp_path / "journal.sqlite") as j:
        yield j


def test_dedupes_and_resumes_with_zero_reissued_requests(journal):
    backend = LiteLLMBackend()
    with FakeServer(latency=0.01) as srv:
        opts = options(srv)
        first = make_requests(backend, opts, 20)
        out = run_requests(backend, opts, first + first[:5], journal)  # 5 duplicates in the batch
        assert len(out) == 20 and all(r.ok for r in out.values())
        assert srv.request_count == 20 and all(v == 1 for v in srv.attempts_by_prompt().values())

        srv.reset()
        more = make_requests(backend, opts, 30)  # the same 20 + 10 new
        out2 = run_requests(backend, opts, more, journal)
        assert srv.request_count == 10  # only the new ones were sent
        assert {p for p in srv.attempts_by_prompt()} == {f"question {i}" for i in range(20, 30)}
        assert [out2[r.key].text for r in more] == [f"echo: question {i}" for i in range(30)]
        assert len(journal) == 30


def test_progress_events(journal):
    backend = LiteLLMBackend()
    with FakeServer() as srv:
        opts = options(srv)
        reqs = make_requests(backend, opts, 12)
        run_requests(backend, opts, reqs[:4], journal)
        events: list[GenerationProgress] = []
        run_requests(backend, opts, reqs, journal, progress=events.append)
        assert events[0].done == 4 and events[0].cached == 4 and events[0].last is None
        assert [e.done for e in events] == list(range(4, 13))
        last = events[-1]
        assert (last.total, last.done, last.succeeded, last.failed, last.remaining) == (12, 12, 8, 0, 0)
        assert last.input_tokens == 16 and last.output_tokens == 24  # 2 and 3 words per request
        assert last.requests_per_s > 0 and last.elapsed_s > 0 and last.cost == 0.0


def test_throttled_progress_builds_no_event_per_result_and_ends_with_the_totals(journal):
    backend = LiteLLMBackend()
    with FakeServer() as srv:
        opts = options(srv)
        reqs = make_requests(backend, opts, 30)
        run_requests(backend, opts, reqs[:5], journal)
        events: list[GenerationProgress] = []
        # Progress off (an infinite interval): the first event and the final totals, nothing between.
        run_requests(backend, opts, reqs, journal, progress=events.append, progress_interval_s=math.inf)
        assert [e.done for e in events] == [5, 30]
        last = events[-1]
        assert (last.total, last.cached, last.succeeded, last.failed) == (30, 5, 25, 0)
        assert last.input_tokens == 50 and last.output_tokens == 75 and last.last is not None


def test_throttled_progress_still_hands_over_the_totals_when_fail_fast_stops_the_run(journal):
    backend = LiteLLMBackend()
    with FakeServer(latency=0.02, fault_fn=lambda p, a: "400" if p == "question 5" else None) as srv:
        opts = options(srv, concurrency=2)
        events: list[GenerationProgress] = []
        with pytest.raises(RunError):
            run_requests(backend, opts, make_requests(backend, opts, 40), journal, fail_fast=True,
                         progress=events.append, progress_interval_s=math.inf)
        last = events[-1]
        assert last.failed == 1 and last.succeeded == len(journal) and last.done == 1 + len(journal)


def test_failures_are_returned_journaled_and_retried_next_run(journal):
    backend = LiteLLMBackend()
    # "question 3" fails on its first request ever (max_retries=0), then works on the next run.
    seen: set[str] = set()

    def fault(prompt: str, attempt: int) -> str | None:
        first = prompt not in seen
        seen.add(prompt)
        return "500" if prompt == "question 3" and first else None

    with FakeServer(fault_fn=fault) as srv:
        opts = options(srv, max_retries=0)
        reqs = make_requests(backend, opts, 6)
        events = []
        out = run_requests(backend, opts, reqs, journal, progress=events.append)
        bad = reqs[3].key
        assert not out[bad].ok and "500" in out[bad].error
        assert sum(r.ok for r in out.values()) == 5 and events[-1].failed == 1
        assert set(journal.failures()) == {bad}
        srv.reset()
        out = run_requests(backend, opts, reqs, journal)
        assert srv.request_count == 1 and out[bad].ok and journal.failures() == {}


def test_fail_fast_raises_after_persisting(journal):
    backend = LiteLLMBackend()
    with FakeServer(latency=0.02, fault_fn=lambda p, a: "400" if p == "question 5" else None) as srv:
        opts = options(srv, concurrency=2)
        reqs = make_requests(backend, opts, 40)
        with pytest.raises(RunError) as exc_info:
            run_requests(backend, opts, reqs, journal, fail_fast=True)
        assert "row5" in str(exc_info.value) and "400" in str(exc_info.value)
        assert reqs[5].key in journal.failures()
        done = len(journal)
        assert 3 <= done < 40  # what completed before the failure is journaled; the rest not sent
        assert srv.request_count <= done + 1 + 2


def test_auth_failure_is_clear(journal):
    backend = LiteLLMBackend()
    with FakeServer(api_key="expected") as srv:
        opts = options(srv)
        with pytest.raises(RunError) as exc_info:
            run_requests(backend, opts, make_requests(backend, opts, 10), journal, fail_fast=True)
        text = str(exc_info.value)
        assert "RUNNER_KEY" in text and "401" in text and "sk-runner" not in text


class _ForgetfulBackend:
    """A plugin that answers only even-numbered requests and swallows callback errors."""

    name, version = "forgetful", "1"
    options_schema = {"type": "object", "additionalProperties": False}

    def identity(self, options):
        return {"backend": "forgetful"}

    def price(self, options, i, o):
        return 0.0

    def generate(self, options, requests, on_result):
        for n, r in enumerate(requests):
            if n % 2 == 0:
                try:
                    on_result(GenResult(key=r.key, text=None if n == 2 else "ok",
                                        error="boom" if n == 2 else None))
                except Exception:
                    pass  # a sloppy plugin: the runner must still stop the run


def _plain_requests(n: int) -> list[GenRequest]:
    return [GenRequest(key=f"k{i}", messages=({"role": "user", "content": str(i)},)) for i in range(n)]


def test_missing_results_become_failures(journal):
    out = run_requests(_ForgetfulBackend(), {}, _plain_requests(4), journal)
    assert out["k0"].ok and out["k1"].error == NO_RESULT and out["k2"].error == "boom"
    assert set(journal.failures()) == {"k1", "k2", "k3"}


def test_fail_fast_even_when_the_backend_swallows_the_error(journal):
    with pytest.raises(RunError, match="boom"):
        run_requests(_ForgetfulBackend(), {}, _plain_requests(6), journal, fail_fast=True)


_CHILD = textwrap.dedent("""
    import sys
    from specdsl.backends.litellm.backend import LiteLLMBackend
    from specdsl.execute.generation import run_requests
    from specdsl.execute.journal import RequestJournal
    from specdsl.contract.hookspecs import GenRequest, request_key
    api_base, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    b = LiteLLMBackend()
    opts = {"model": "openai/fake", "api_base": api_base, "api_key": "sk-runner", "concurrency": 4}
    ident = b.identity(opts)
    reqs = []
    for i in range(n):
        msgs = ({"role": "user", "content": f"question {i}"},)
        reqs.append(GenRequest(key=request_key(ident, msgs, {}), messages=msgs))
    print("start", flush=True)
    run_requests(b, opts, reqs, RequestJournal(path))
    print("finished", flush=True)
""")


@pytest.mark.multiprocess
def test_resume_after_sigkill_reissues_no_completed_request(tmp_path):
    path = tmp_path / "journal.sqlite"
    n = 120
    with FakeServer(latency=0.05) as srv:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, srv.api_base, str(path), str(n)],
                                cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "start"
            deadline = time.monotonic() + 60
            while srv.request_count < 40 and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)  # mid-run, requests in flight
        finally:
            proc.kill()
            proc.wait(30)
        first_run = srv.attempts_by_prompt()
        assert 40 <= sum(first_run.values()) < n

        backend = LiteLLMBackend()
        opts = {"model": "openai/fake", "api_base": srv.api_base, "api_key": "sk-runner",
                "concurrency": 4}
        reqs = make_requests(backend, opts, n)
        with RequestJournal(path) as j:
            done_before = j.get_many(r.key for r in reqs)
            assert len(done_before) >= 30
            srv.reset()
            out = run_requests(backend, opts, reqs, j)
        assert all(r.ok for r in out.values()) and len(out) == n
        resumed = srv.attempts_by_prompt()
        journaled_prompts = {r.messages[0]["content"] for r in reqs if r.key in done_before}
        assert not journaled_prompts & set(resumed), "a journaled request was sent again"
        assert sum(resumed.values()) == n - len(done_before)
        # At most the requests in flight at the kill (concurrency 4) were answered but lost.
        assert sum(first_run.values()) - len(done_before) <= 4


def test_a_progress_callback_error_is_raised_unchanged(journal):
    backend = LiteLLMBackend()
    with FakeServer() as srv:
        opts = options(srv)

        def progress(ev: GenerationProgress) -> None:
            if ev.done == 2:
                raise ZeroDivisionError("bar broke")

        with pytest.raises(ZeroDivisionError):
            run_requests(backend, opts, make_requests(backend, opts, 10), journal, progress=progress)
        assert len(journal) >= 2  # journaled before the progress callback ran


def test_a_batch_collects_its_young_objects_less_often_and_puts_the_collector_back():
    """During a batch the heap before it is frozen and the young generation's threshold raised (the
    requests in flight would be walked every few dozen answers); both are as they were after, also when
    two batches overlap on two threads."""
    import gc
    import threading

    from specdsl.execute.generation import BATCH_GC_THRESHOLD, heap_frozen

    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    inside = threading.Event()
    leave = threading.Event()

    def other_batch():
        with heap_frozen():
            inside.set()
            leave.wait(10)

    with heap_frozen():
        assert gc.get_threshold()[0] == max(before[0], BATCH_GC_THRESHOLD)
        assert gc.get_threshold()[1:] == before[1:]
        assert gc.get_freeze_count() > 0
        thread = threading.Thread(target=other_batch)
        thread.start()
        assert inside.wait(10)
    assert gc.get_threshold()[0] == max(before[0], BATCH_GC_THRESHOLD)  # the other batch still runs
    leave.set()
    thread.join(10)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0

    # A run (api.run_plan) raises the threshold around its batches too: the last one out puts it back.
    from specdsl.execute.generation import young_collections_rarer

    with young_collections_rarer():
        with heap_frozen():
            assert gc.get_threshold()[0] == max(before[0], BATCH_GC_THRESHOLD)
        assert gc.get_threshold()[0] == max(before[0], BATCH_GC_THRESHOLD)
        assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before
