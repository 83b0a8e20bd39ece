"""``generate`` streams: its input is read a batch at a time, answered a window of requests at a time, and
its output written a batch at a time, so neither table is ever whole in memory.

A window is ``WINDOW_BATCHES`` input batches (``SPECDSL_BATCH_ROWS``): these tests set 4-row batches, so
a 16-request window, and compare with one window over the whole table. The litellm backend talks to
tests/fakeserver.py over real HTTP; nothing of ours is mocked.
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from specdsl import api
from specdsl.contract.hookspecs import GenRequest
from specdsl.execute.progress import Display
from specdsl.execute.services import Services
from specdsl.execute.store import Store
from specdsl.ops.generate import WINDOW_BATCHES, generation_windows
from specdsl.plugins import default_registry
from tests.fakeserver import FakeServer

pytestmark = pytest.mark.fast

SPEC = """\
specdsl: 1
name: stream-test
models:
  teacher:
    backend: litellm
    model: openai/fake
    api_base: {api_base}
    api_key: ${{env:SPECDSL_TEST_KEY}}
    concurrency: 4
    max_retries: 0
    timeout_s: 5
sources:
  problems: {{path: problems.jsonl}}
steps:
  - id: answers
    generate: {{from: problems, model: teacher, user: "Q: {{{{ row.question }}}}", n: {n}}}
  - id: shaped
    map: {{from: answers, columns: {{short: "{{{{ row.response[:14] }}}}"}}}}
"""

ROWS = 30
BATCH = 4  # rows per batch in the windowed runs: windows of WINDOW_BATCHES * 4 = 16 rows


def question(i: int) -> str:
    return f"question {1 if i == 25 else i}"  # row 25 asks row 1's question: a repeat two windows later


def write_spec(folder: Path, srv: FakeServer, n: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "problems.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "question": question(i)}) + "\n" for i in range(ROWS)))
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(api_base=srv.api_base, n=n))
    return spec


def run(spec: Path, **kw):
    return api.run_plan(api.compile_spec(spec), store_dir=spec.parent / "store", progress=False, **kw)


def row_groups(result, node_id: str) -> int:
    import pyarrow.parquet as pq

    node = result.plan.node(node_id)
    return pq.ParquetFile(result.store.node_dir(node.fingerprint) / "data.parquet").num_row_groups


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("SPECDSL_TEST_KEY", "sk-test-secret-value")


def test_windows_give_the_table_one_call_gives_and_wait_for_each_other(tmp_path, monkeypatch):
    order: list[str] = []
    lock = threading.Lock()

    def record(prompt: str, attempt: int) -> None:
        with lock:
            order.append(prompt)
        return None

    with FakeServer(fault_fn=record) as srv:
        whole = run(write_spec(tmp_path / "whole", srv))
        assert whole.ok and srv.request_count == ROWS - 1  # the repeated question is asked once
        order.clear()
        monkeypatch.setenv("SPECDSL_BATCH_ROWS", str(BATCH))
        windowed = run(write_spec(tmp_path / "windowed", srv))
        assert windowed.ok

    # The same rows, in the same order, with the same answers, and the same totals.
    assert windowed.rows("answers") == whole.rows("answers")
    assert windowed.rows("shaped") == whole.rows("shaped")
    assert [r["id"] for r in windowed.rows("answers")] == [f"q{i}" for i in range(ROWS)]
    assert windowed.rows("answers")[25]["response"] == "echo: Q: question 1"
    for name in ("input_tokens", "output_tokens", "failed"):
        assert windowed.report("answers").stats[name] == whole.report("answers").stats[name], name
    # The repeat two windows on is counted as a request the journal answered (one call dedupes it).
    stats = windowed.report("answers").stats
    assert (stats["requests"], stats["cached_requests"]) == (ROWS, 1)
    assert whole.report("answers").stats["requests"] == ROWS - 1
    assert len(order) == ROWS - 1  # a store (and journal) of its own: asked again, each question once
    # Window 1 (rows 0-15) is answered before window 2's requests are sent: the windows never overlap,
    # so at most one window of rows and answers is held. Row 25's repeat is answered by the journal.
    window = WINDOW_BATCHES * BATCH
    first = {f"Q: question {i}" for i in range(window)}
    assert set(order[:window]) == first and not first & set(order[window:])
    # The output went to disk a batch at a time: one row group per 4-row batch.
    assert row_groups(windowed, "answers") == -(-ROWS // BATCH)
    assert row_groups(whole, "answers") == 1


def test_samples_are_windowed_by_input_rows_and_keep_their_ids(tmp_path, monkeypatch):
    with FakeServer() as srv:
        whole = run(write_spec(tmp_path / "whole", srv, n=3))
        monkeypatch.setenv("SPECDSL_BATCH_ROWS", str(BATCH))
        windowed = run(write_spec(tmp_path / "windowed", srv, n=3))
    assert whole.ok and windowed.ok
    assert windowed.rows("answers") == whole.rows("answers")
    assert [r["id"] for r in windowed.rows("answers")[:4]] == ["q0#0", "q0#1", "q0#2", "q1#0"]
    sent = [r.report("answers").stats["requests"] - r.report("answers").stats["cached_requests"]
            for r in (whole, windowed)]
    assert sent == [3 * (ROWS - 1)] * 2  # row 25 repeats row 1's three samples: sent once either way


def test_a_failure_in_a_later_window_keeps_the_rest_and_is_retried_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDSL_BATCH_ROWS", str(BATCH))
    broken = {"Q: question 20", "Q: question 21"}
    with FakeServer(fault_fn=lambda prompt, attempt: "500" if prompt in broken else None) as srv:
        spec = write_spec(tmp_path, srv)
        result = run(spec)
        assert not result.ok
        report = result.report("answers")
        assert report.status == "incomplete" and report.stats["failed"] == 2 and report.rows == ROWS - 2
        assert any(e.startswith("2 rows (q20, q21)") for e in report.stats["errors"]), report.stats["errors"]
        # Not committed, yet what it did compute flows on (read back from its staging table).
        assert result.report("shaped").status == "incomplete" and result.report("shaped").rows == ROWS - 2
        assert not result.store.has(result.plan.node("answers").fingerprint)
        before = srv.request_count
        broken.clear()
        again = run(spec)
    assert again.ok and srv.request_count == before + 2  # only the two failed requests are sent again
    assert [r["id"] for r in again.rows("answers")] == [f"q{i}" for i in range(ROWS)]


def test_a_fail_fast_failure_in_a_later_window_commits_nothing_and_keeps_the_answers(tmp_path, monkeypatch):
    from specdsl.errors import RunError

    monkeypatch.setenv("SPECDSL_BATCH_ROWS", str(BATCH))
    with FakeServer(fault_fn=lambda prompt, attempt: "400" if prompt == "Q: question 22" else None) as srv:
        spec = write_spec(tmp_path, srv)
        with pytest.raises(RunError, match="q22"):
            run(spec, fail_fast=True)
    plan = api.compile_spec(spec)
    assert not Store(tmp_path / "store").has(plan.node("answers").fingerprint)
    with sqlite3.connect(tmp_path / "store" / "journal.sqlite") as db:  # the first window's answers were kept
        answered = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert answered >= WINDOW_BATCHES * BATCH - 1


def test_one_progress_bar_runs_on_across_windows(tmp_path):
    out = io.StringIO()
    display = Display(mode="lines", stream=out, interval_s=0.05)
    with FakeServer() as srv:
        plan = api.compile_spec(write_spec(tmp_path, srv))
        registry = default_registry()
        services = Services(plan, Store(tmp_path / "store"), registry, executor=registry.executors["local"],
                            progress=display)

        def window(start: int, end: int) -> list[GenRequest]:
            return [GenRequest(key=f"k{i}", messages=({"role": "user", "content": f"Q: {i}"},), params={},
                               row_id=str(i)) for i in range(start, end)]

        with display:
            with services.generation("answers", "teacher") as session:
                session.answer(window(0, 12), remaining=8)
                time.sleep(0.3)  # a few ticks of the line printer
                assert "12/20 req" in out.getvalue()  # after window 1: 12 of the 20 that will come
                session.answer(window(12, 20))
    text = out.getvalue()
    assert text.count("answers · teacher: started") == 1 and "started, 20 req" in text
    assert re.search(r"20/20 req.*\(finished\)", text), text
    stats = services.stats["answers"]
    assert stats.requests == 20 and stats.failed == 0 and stats.input_tokens > 0


def test_windows_take_whole_batches_and_close_at_a_request_or_text_limit():
    def part(n: int, chars: int = 1) -> list:
        return [({}, None, [{"role": "user", "content": "x" * chars}]) for _ in range(n)]

    sizes = [len(w) for w in generation_windows([part(4)] * 5, max_requests=8)]
    assert sizes == [8, 8, 4]
    sizes = [len(w) for w in generation_windows([part(4, 100)] * 3, max_requests=1000, max_chars=500)]
    assert sizes == [8, 4]  # 400 chars after one batch, 800 after two: closes there
    assert [len(w) for w in generation_windows([part(10)], max_requests=4)] == [10]  # never splits a batch
    assert list(generation_windows([], max_requests=4)) == []


def test_an_empty_input_sends_nothing_and_commits_an_empty_table(tmp_path):
    with FakeServer() as srv:
        spec = write_spec(tmp_path, srv)
        spec.write_text(spec.read_text().replace(
            "  - id: answers\n    generate: {from: problems,",
            "  - id: none\n    filter: {from: problems, where: \"{{ row.question == 'nothing' }}\"}\n"
            "  - id: answers\n    generate: {from: none,"))
        result = run(spec)
        again = run(spec)
    assert result.ok and srv.request_count == 0
    assert result.report("answers").rows == 0 and result.rows("answers") == []
    assert result.report("shaped").status == "ran" and result.rows("shaped") == []
    assert {n.status for n in again.nodes} == {"cached"}


DIVIDE_SPEC = """\
specdsl: 1
name: where-test
models:
  teacher: {{backend: litellm, model: openai/fake, api_base: {api_base}, api_key: "${{env:SPECDSL_TEST_KEY}}",
            max_retries: 0}}
sources:
  problems: {{path: problems.jsonl}}
steps:
  - id: answers
    generate: {{from: problems, model: teacher, user: "{{{{ 12 // row.d }}}}"{where}}}
"""


def divide_spec(folder: Path, srv: FakeServer, where: str = "") -> Path:
    """Rows q0..q5 with d = 1, 2, 3, 0, 4, 6: the template divides by zero on q3 alone."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "problems.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "d": d}) + "\n" for i, d in enumerate([1, 2, 3, 0, 4, 6])))
    spec = folder / "spec.yaml"
    spec.write_text(DIVIDE_SPEC.format(api_base=srv.api_base, where=f", where: \"{where}\"" if where else ""))
    return spec


def test_a_template_that_fails_on_one_row_names_that_row_and_sends_nothing(tmp_path):
    from specdsl.errors import RunError

    with FakeServer() as srv:
        with pytest.raises(RunError, match=r"template failed on row id='q3': .*division"):
            run(divide_spec(tmp_path, srv))
        assert srv.request_count == 0  # the window's requests are built before any is sent


def test_where_skips_a_row_before_its_prompt_is_rendered(tmp_path):
    with FakeServer() as srv:
        result = run(divide_spec(tmp_path, srv, where="{{ row.d != 0 }}"))
        assert result.ok and srv.request_count == 5
    rows = {r["id"]: r for r in result.rows("answers")}
    assert rows["q3"]["response"] is None and rows["q3"]["response_prompt"] is None  # skipped, kept
    assert rows["q4"]["response"] == "echo: 3" and rows["q4"]["response_prompt"] == [{"role": "user", "content": "3"}]


def test_a_batch_of_prompts_renders_as_row_by_row():
    from specdsl.ops.generate import prompt_messages, prompt_messages_many

    rows = [{"id": f"q{i}", "q": f"question {i} «é»", "n": i} for i in range(5)]
    variables = {"tone": "brief"}
    for params in ({"user": "{{ row.q }}"},
                   {"system": "Be {{ tone }}.", "user": "{{ row.q }} #{{ row.n }}"},
                   {"messages": [{"role": "system", "content": "{% if row.n %}odd{% endif %}"},
                                 {"role": "user", "content": "{{ row.q | upper }}"},
                                 {"role": "assistant", "content": "fixed"}]}):
        assert prompt_messages_many(params, rows, variables) == [prompt_messages(params, r, variables) for r in rows]
    assert prompt_messages_many({"user": "{{ row.q }}"}, [], variables) == []


def test_after_a_run_the_journal_file_alone_holds_every_answer(tmp_path):
    import shutil

    from specdsl.execute.journal import RequestJournal

    with FakeServer() as srv:
        result = run(write_spec(tmp_path, srv))
    assert result.ok
    journal = tmp_path / "store" / "journal.sqlite"
    assert not journal.with_name("journal.sqlite-wal").exists()  # closed and checkpointed by the run
    copied = tmp_path / "elsewhere" / "journal.sqlite"
    copied.parent.mkdir()
    shutil.copy(journal, copied)  # the file alone, as a user would move it
    with RequestJournal(copied) as alone:
        assert len(alone) == ROWS - 1  # row 25 repeats row 1's question: one answer serves both
