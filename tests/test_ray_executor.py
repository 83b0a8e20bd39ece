"""The Ray executor against a real local Ray instance (2 CPUs), compared with the local executor.

* a spec with map / filter / format / erase_prompt steps writes byte-identical tables under
  ``executor="ray"`` and ``executor="local"``, and its row ops really ran in Ray worker processes;
* an error raised by an op inside a Ray task is the same RunError the local executor raises;
* a generate node through a deterministic backend (a plugin defined here, logging every request it
  receives to a file, so requests answered in Ray workers are counted too) gives identical tables;
  every request is sent exactly once, a second run is a cache hit with zero requests, and requests
  already in the journal are never sent to Ray;
* failed requests are retried on the next run, and only those;
* the executor API directly: results reach ``on_result`` in the driver thread, a worker that dies
  turns its unanswered requests into failed results, a backend that raises raises the same RunError;
* a model's ``concurrency``, ``rpm`` and ``tpm`` hold for all the Ray tasks of a generate step together
  (the fake server counts requests in flight and stamps each one), and a task that dies while it holds
  a concurrency slot gives it back.

Ray starts once for the module (about 10 s).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray  # every test here shares a local Ray cluster (seconds to start)

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'specdsl[ray]')")

from specdsl import api  # noqa: E402
from specdsl.errors import RunError  # noqa: E402
from specdsl.execute.journal import RequestJournal  # noqa: E402
from specdsl.contract.hookspecs import GenRequest, GenResult, hookimpl  # noqa: E402
from specdsl.plugins import build_registry  # noqa: E402
from specdsl.contract.ops import COLUMN, STEP_REF, StepOp, obj_schema  # noqa: E402


# --------------------------------------------------------------------------------------------------
# A test plugin: backend `tally` (deterministic, logs every request it is sent) and op `worker_pid`
# --------------------------------------------------------------------------------------------------


class TallyBackend:
    """Answers deterministically; appends one line per request it receives to ``options['log']``.

    ``fail: WORD`` makes requests whose prompt contains WORD fail (a GenResult error), as a provider
    error would after its retries.
    """

    name = "tally"
    version = "1"
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"log": {"type": "string"}, "fail": {"type": "string"}},
    }

    def identity(self, options):
        return {"model": options["model"]}  # neither the log file nor the fault switch change answers

    def price(self, options, input_tokens, output_tokens):
        return 0.0

    def generate(self, options, requests, on_result):
        for r in requests:
            prompt = r.messages[-1]["content"]
            with open(options["log"], "a") as f:
                f.write(json.dumps({"key": r.key, "prompt": prompt, "pid": os.getpid()}) + "\n")
            if options.get("fail") and options["fail"] in prompt:
                on_result(GenResult(key=r.key, error="provider said no"))
                continue
            digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
            on_result(GenResult(key=r.key, text=f"[{digest}] Answer: {len(prompt)}",
                                input_tokens=len(prompt.split()), output_tokens=3))


class WorkerPidOp(StepOp):
    name = "worker_pid"
    description = "add the id of the process that ran the row"
    row_parallel = True
    params_schema = obj_schema({"from": STEP_REF, "into": COLUMN}, required=["from"])

    def check(self, ctx):
        return tuple(ctx.columns) + (ctx.params.get("into", "pid"),)

    def run(self, ctx):
        return [{**row, ctx.params.get("into", "pid"): os.getpid()} for row in ctx.rows]


class TestPlugin:
    @staticmethod
    @hookimpl
    def register_backends(register):
        register(TallyBackend())

    @staticmethod
    @hookimpl
    def register_ops(register):
        register(WorkerPidOp())


def make_registry(**settings):
    """A registry with the built-ins and the test plugin; the ray executor configured with ``settings``."""
    reg = build_registry(extra_plugins=(TestPlugin(),))
    for key, value in settings.items():
        setattr(reg.executors["ray"], key, value)
    return reg


@pytest.fixture(scope="module")
def ray_instance():
    # Workers must unpickle the plugin classes above whatever the working directory of pytest is.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from specdsl.executors.ray import ensure_ray

    started_here = not ray.is_initialized()
    ensure_ray(num_cpus=2)  # the executor's own start-up path: a private local instance
    assert ray.cluster_resources().get("CPU") == 2.0 or not started_here
    yield ray
    if started_here:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _only_builtins(monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------

CATEGORIES = ("addition", "subtraction", "multiplication", "word_problem")


def write_rows(path: Path, n: int = 40) -> None:
    with path.open("w") as f:
        for i in range(n):
            a, b = 3 * i + 1, 7 * i % 11
            cat = CATEGORIES[i % 4]
            f.write(json.dumps({
                "id": f"q{i:03d}", "a": a, "b": b, "category": cat,
                "question": f"What is {a} plus {b}?", "answer": str(a + b),
                # what a teacher saw: a detailed instruction, then the question
                "response_prompt": [{"role": "system", "content": f"Strategy for {cat}: add carefully."},
                                    {"role": "user", "content": f"What is {a} plus {b}?"}],
                "tags": ["even" if i % 2 == 0 else "odd", cat], "weight": i / 7,
            }) + "\n")


ROWS_SPEC = """\
specdsl: 1
name: ray-rows
seed: 3
sources:
  problems: {path: problems.jsonl}
vars:
  greeting: "Solve:"
steps:
  - id: answered
    map:
      from: problems
      columns:
        response: "Reasoning for {{ row.id }}. Answer: {{ row.a + row.b if row.a % 5 else row.a }}"
        label: "{{ row.category | upper }}-{{ row.tags | length }}"
  - id: right
    filter: {from: answered, match: {field: response, gold: answer, rule: number}}
  - id: verdicts
    filter: {from: answered, where: "{{ row.a % 3 == 1 }}", into: odd_one}
  - id: erased
    erase_prompt: {from: right, generic_system: "You are a helpful assistant."}
  - id: pairs
    format:
      from: right
      to: prompt_completion
      prompt: "{{ vars.greeting }} {{ row.question }}"
      completion: "{{ row.response }}"
  - id: save_erased
    export: {from: erased, path: out/erased, card: false}
  - id: save_pairs
    export: {from: pairs, path: out/pairs, format: parquet, card: false}
  - id: chats
    format:
      from: verdicts
      system: "You answer arithmetic."
      user: "{{ row.question }}"
      assistant: "{{ row.response }} ({{ row.odd_one }})"
"""

GEN_SPEC = """\
specdsl: 1
name: ray-gen
seed: 0
models:
  teacher: {{backend: tally, model: tally-1, log: {log}{fail}}}
sources:
  problems: {{path: problems.jsonl, limit: {limit}}}
steps:
  - id: answers
    generate:
      from: problems
      model: teacher
      system: "Strategy for {{{{ row.category }}}}."
      user: "{{{{ row.question }}}}"
      temperature: 0
  - id: kept
    filter: {{from: answers, where: "{{{{ row.response is not none }}}}"}}
  - id: erased
    erase_prompt: {{from: kept, generic_system: "You are a helpful assistant."}}
"""


def make_spec(folder: Path, text: str, name: str = "spec.yaml", rows: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "problems.jsonl").exists():
        write_rows(folder / "problems.jsonl", rows)
    path = folder / name
    path.write_text(text)
    return path


def gen_spec(folder: Path, log: Path, *, limit: int = 40, fail: str | None = None, name: str = "gen.yaml") -> Path:
    return make_spec(folder, GEN_SPEC.format(log=json.dumps(str(log)), limit=limit,
                                             fail=f", fail: {json.dumps(fail)}" if fail else ""), name)


def run(spec: Path, store: Path, executor: str, registry):
    plan = api.compile_spec(spec, registry=registry)
    result = api.run_plan(plan, store_dir=store, executor=executor, registry=registry, progress=False)
    return plan, result


def table_bytes(result, node_id: str) -> bytes:
    node = result.plan.node(node_id)
    return (result.store.node_dir(node.fingerprint) / "data.parquet").read_bytes()


def logged(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --------------------------------------------------------------------------------------------------
# Row-parallel ops
# --------------------------------------------------------------------------------------------------


def test_registered_without_importing_ray():
    import subprocess

    code = ("import sys; from specdsl.plugins import build_registry; r = build_registry(); "
            "print(sorted(r.executors), 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SPECDSL_PLUGINS": "none"})
    assert out.stdout.split() == ["['local',", "'ray']", "False"]


def test_row_ops_give_byte_identical_tables(ray_instance, tmp_path):
    reg = make_registry(rows_per_task=3)   # 40 rows -> 14 chunks per node
    _, local = run(make_spec(tmp_path / "local", ROWS_SPEC), tmp_path / "local-store", "local", reg)
    _, remote = run(make_spec(tmp_path / "ray", ROWS_SPEC), tmp_path / "ray-store", "ray", reg)
    assert local.ok and remote.ok
    node_ids = ["answered", "right", "verdicts", "erased", "pairs", "chats"]
    assert {n.id for n in remote.nodes if n.status == "ran"} >= set(node_ids)
    for node_id in node_ids:
        assert local.rows(node_id) == remote.rows(node_id), node_id
        assert table_bytes(local, node_id) == table_bytes(remote, node_id), node_id
    exported = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray" / "out").rglob("*") if p.is_file())
    assert exported
    for rel in exported:
        assert (tmp_path / "ray" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes(), rel
    # the filters really filtered, and the ops saw every chunk in order
    assert 0 < len(remote.rows("right")) < 40
    assert [r["id"] for r in remote.rows("answered")] == [f"q{i:03d}" for i in range(40)]
    assert all(m["role"] != "system" or m["content"] == "You are a helpful assistant."
               for r in remote.rows("erased") for m in r["messages"])


def test_row_ops_run_in_ray_workers_in_order(ray_instance, tmp_path):
    spec = make_spec(tmp_path, "specdsl: 1\nname: pids\nsources:\n  problems: {path: problems.jsonl}\n"
                               "steps:\n  - id: stamped\n    worker_pid: {from: problems}\n")
    _, result = run(spec, tmp_path / "store", "ray", make_registry(rows_per_task=4))
    rows = result.rows("stamped")
    assert [r["id"] for r in rows] == [f"q{i:03d}" for i in range(40)]
    pids = {r["pid"] for r in rows}
    assert os.getpid() not in pids
    # each chunk of 4 consecutive rows ran in one task
    assert all(len({r["pid"] for r in rows[i:i + 4]}) == 1 for i in range(0, 40, 4))


def test_op_error_in_a_task_is_the_local_run_error(ray_instance, tmp_path):
    bad = ROWS_SPEC.replace("{{ row.a + row.b if row.a % 5 else row.a }}", "{{ 100 // (row.a - 91) }}")
    spec = make_spec(tmp_path / "spec", bad)
    reg = make_registry(rows_per_task=3)
    errors = {}
    for executor in ("local", "ray"):
        with pytest.raises(RunError) as info:
            run(spec, tmp_path / f"{executor}-store", executor, reg)
        errors[executor] = info.value
    assert str(errors["ray"]) == str(errors["local"])
    assert errors["ray"].node == "answered" and "q030" in str(errors["ray"])
    assert "Traceback" not in str(errors["ray"]) and "Ray" not in str(errors["ray"])


def test_map_rows_directly(ray_instance):
    from specdsl.executors.ray import RayExecutor

    rows = [{"i": i} for i in range(23)]
    ex = RayExecutor(rows_per_task=5)
    assert ex.map_rows(functools.partial(_scale, k=3), rows) == [{"i": i, "x": 3 * i} for i in range(23)]
    assert ex.map_rows(functools.partial(_scale, k=3), []) == []
    with pytest.raises(ZeroDivisionError) as info:
        ex.map_rows(functools.partial(_scale, k=None), rows)
    assert "raised in a Ray task" in "".join(getattr(info.value, "__notes__", []))


def _scale(rows, k):
    if k is None:
        return [1 // 0]
    return [{**r, "x": r["i"] * k} for r in rows]


# --------------------------------------------------------------------------------------------------
# Generation through the journal
# --------------------------------------------------------------------------------------------------


def test_generation_identical_each_request_once_then_cached(ray_instance, tmp_path):
    reg = make_registry(requests_per_task=3)   # 40 requests -> 14 tasks
    local_log, ray_log = tmp_path / "local.log", tmp_path / "ray.log"
    _, local = run(gen_spec(tmp_path / "a", local_log), tmp_path / "local-store", "local", reg)
    spec = gen_spec(tmp_path / "b", ray_log)
    plan, remote = run(spec, tmp_path / "ray-store", "ray", reg)
    assert local.ok and remote.ok
    for node_id in ("answers", "kept", "erased"):
        assert table_bytes(local, node_id) == table_bytes(remote, node_id), node_id

    sent = logged(ray_log)
    keys = [s["key"] for s in sent]
    assert len(keys) == 40 and len(set(keys)) == 40          # every request sent exactly once
    assert os.getpid() not in {s["pid"] for s in sent}       # ... and answered in Ray workers
    assert remote.report("answers").stats["requests"] == 40
    assert sorted(keys) == sorted(s["key"] for s in logged(local_log))
    with RequestJournal(tmp_path / "ray-store" / "journal.sqlite") as journal:
        assert sorted(journal.keys()) == sorted(keys) and journal.failure_count() == 0

    _, again = run(spec, tmp_path / "ray-store", "ray", reg)  # second run: cache hits, nothing sent
    assert [n.status for n in again.nodes] == ["cached"] * len(again.nodes)
    assert len(logged(ray_log)) == 40


def test_journaled_requests_are_not_sent_to_ray(ray_instance, tmp_path):
    """Half the requests answered by a local run; the full spec under Ray sends only the other half."""
    reg = make_registry(requests_per_task=4)
    log = tmp_path / "requests.log"
    store = tmp_path / "store"
    _, first = run(gen_spec(tmp_path, log, limit=20, name="half.yaml"), store, "local", reg)
    assert first.ok and len(logged(log)) == 20
    _, full = run(gen_spec(tmp_path, log, limit=40, name="full.yaml"), store, "ray", reg)
    assert full.ok
    sent = logged(log)
    assert len(sent) == 40 and len({s["key"] for s in sent}) == 40
    assert all(s["pid"] != os.getpid() for s in sent[20:])
    stats = full.report("answers").stats
    assert stats["requests"] == 40 and stats["cached_requests"] == 20
    _, alone = run(gen_spec(tmp_path / "fresh", tmp_path / "fresh.log", limit=40), tmp_path / "fresh-store",
                   "local", reg)
    assert table_bytes(alone, "answers") == table_bytes(full, "answers")


def test_failed_requests_are_retried_next_run_and_only_them(ray_instance, tmp_path):
    reg = make_registry(requests_per_task=3)
    log = tmp_path / "requests.log"
    store = tmp_path / "store"
    _, first = run(gen_spec(tmp_path, log, fail="7", name="faulty.yaml"), store, "ray", reg)
    failing = {s["key"] for s in logged(log) if "7" in s["prompt"]}
    assert failing and first.report("answers").status == "incomplete"
    assert first.report("answers").stats["failed"] == len(failing)
    with RequestJournal(store / "journal.sqlite") as journal:
        assert set(journal.failures()) == failing and len(journal) == 40 - len(failing)
    _, second = run(gen_spec(tmp_path, log, name="healthy.yaml"), store, "ray", reg)
    assert second.ok
    resent = [s["key"] for s in logged(log)[40:]]
    assert sorted(resent) == sorted(failing)
    with RequestJournal(store / "journal.sqlite") as journal:
        assert journal.failures() == {} and len(journal) == 40
    _, clean = run(gen_spec(tmp_path / "clean", tmp_path / "clean.log"), tmp_path / "clean-store", "local", reg)
    assert table_bytes(clean, "answers") == table_bytes(second, "answers")


LITELLM_SPEC = """\
specdsl: 1
name: ray-litellm
models:
  teacher: {{backend: litellm, model: openai/fake, api_base: "{api_base}", api_key: "${{env:SPECDSL_RAY_TEST_KEY}}",
            concurrency: 4, retry_backoff_s: 0.01}}
sources:
  problems: {{path: problems.jsonl}}
steps:
  - id: answers
    generate: {{from: problems, model: teacher, user: "{{{{ row.question }}}}", max_tokens: 32}}
  - id: erased
    erase_prompt: {{from: answers, generic_system: "You are a helpful assistant."}}
"""


def test_litellm_against_the_fake_server_under_ray(ray_instance, tmp_path, monkeypatch):
    """The real litellm backend (it holds a lock, so workers look it up by name) over real HTTP."""
    pytest.importorskip("litellm")
    from tests.fakeserver import FakeServer

    monkeypatch.setenv("SPECDSL_RAY_TEST_KEY", "sk-ray-test")
    reg = make_registry(requests_per_task=5)
    with FakeServer(latency=0.01, api_key="sk-ray-test") as srv:
        text = LITELLM_SPEC.format(api_base=srv.api_base)
        _, local = run(make_spec(tmp_path / "local", text), tmp_path / "local-store", "local", reg)
        assert local.ok and srv.request_count == 40
        srv.reset()
        spec = make_spec(tmp_path / "ray", text)
        _, remote = run(spec, tmp_path / "ray-store", "ray", reg)
        assert remote.ok, remote.report("answers").stats
        assert srv.request_count == 40 and set(srv.attempts_by_prompt().values()) == {1}
        for node_id in ("answers", "erased"):
            assert table_bytes(local, node_id) == table_bytes(remote, node_id), node_id
        assert remote.rows("answers")[0]["response"].startswith("echo: ")
        srv.reset()
        _, again = run(spec, tmp_path / "ray-store", "ray", reg)
        assert {n.status for n in again.nodes} == {"cached"} and srv.request_count == 0


# --------------------------------------------------------------------------------------------------
# The wrapped backend directly
# --------------------------------------------------------------------------------------------------


class ScriptedBackend:
    """Echoes; a prompt 'die' kills the worker process, 'raise' raises a RunError, 'slow' sleeps."""

    name = "scripted"
    version = "1"
    options_schema = {"type": "object"}

    def identity(self, options):
        return {}

    def price(self, options, input_tokens, output_tokens):
        return 0.0

    def generate(self, options, requests, on_result):
        for r in requests:
            prompt = r.messages[-1]["content"]
            if prompt == "die":
                os._exit(3)
            if prompt == "raise":
                raise RunError("the model folder is gone", hint="check the path")
            if prompt == "slow":
                time.sleep(0.5)
            on_result(GenResult(key=r.key, text=f"echo {prompt}"))


def _requests(*prompts):
    return [GenRequest(key=f"k-{i}-{p}", messages=({"role": "user", "content": p},)) for i, p in enumerate(prompts)]


def test_wrapped_backend_streams_results_to_the_driver(ray_instance):
    from specdsl.executors.ray import RayExecutor

    backend = RayExecutor(requests_per_task=2).wrap_backend(ScriptedBackend())
    assert (backend.name, backend.version, backend.identity({})) == ("scripted", "1", {})
    got = []
    reqs = _requests(*[f"p{i}" for i in range(11)])
    backend.generate({}, reqs, lambda r: got.append((r, threading.current_thread() is threading.main_thread())))
    assert sorted(r.key for r, _ in got) == sorted(r.key for r in reqs)
    assert all(main for _, main in got)
    assert {r.key: r.text for r, _ in got} == {r.key: f"echo {r.messages[0]['content']}" for r in reqs}


def test_dead_worker_fails_only_its_unanswered_requests(ray_instance):
    from specdsl.executors.ray import RayExecutor

    backend = RayExecutor(requests_per_task=3).wrap_backend(ScriptedBackend())
    reqs = _requests("a", "b", "c", "d", "die", "f", "g", "h")   # chunks: abc | d,die,f | gh
    got = {}
    backend.generate({}, reqs, lambda r: got.setdefault(r.key, r))
    assert set(got) == {r.key for r in reqs}
    failed = {k for k, r in got.items() if not r.ok}
    assert {reqs[4].key, reqs[5].key} <= failed <= {reqs[3].key, reqs[4].key, reqs[5].key}
    assert all("Ray task answering it died" in got[k].error for k in failed)
    assert all(got[r.key].ok for r in reqs[:3] + reqs[6:])


def test_backend_error_is_the_same_run_error(ray_instance):
    from specdsl.executors.ray import RayExecutor

    backend = RayExecutor(requests_per_task=2).wrap_backend(ScriptedBackend())
    got = []
    with pytest.raises(RunError) as info:
        backend.generate({}, _requests("a", "b", "c", "raise", "slow", "slow", "slow", "slow"), got.append)
    assert str(info.value) == str(RunError("the model folder is gone", hint="check the path"))
    assert {r.text for r in got} >= {"echo c"}   # answered before the failure: delivered (journaled)


class LockedBackend(ScriptedBackend):
    """Holds a lock, so it cannot be pickled: workers look it up by name (and do not have it)."""

    name = "locked"

    def __init__(self):
        self.lock = threading.Lock()


def test_unpicklable_backend_is_looked_up_by_name_on_the_worker(ray_instance):
    from specdsl.executors.ray import RayExecutor

    backend = RayExecutor(requests_per_task=2).wrap_backend(LockedBackend())
    with pytest.raises(RunError) as info:
        backend.generate({}, _requests("a", "b", "c"), lambda r: None)
    assert "generation backend 'locked' is not installed on this Ray worker" in str(info.value)
    assert "specdsl and the plugins" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Limits shared by all the tasks of a generate step
# --------------------------------------------------------------------------------------------------

# hosted_vllm/ at an api_base: the workers answer without importing litellm (seconds per worker).
LIMITED_SPEC = """\
specdsl: 1
name: ray-limits
models:
  teacher: {{backend: litellm, model: hosted_vllm/fake, api_base: "{api_base}", retry_backoff_s: 0.01,
            {limits}}}
sources:
  problems: {{path: problems.jsonl}}
steps:
  - id: answers
    generate: {{from: problems, model: teacher, user: "{{{{ row.question }}}}", max_tokens: 32}}
"""

# 4 tasks at once on the 2-CPU instance, each with 5-10 requests: with per-task limits the server
# would see up to 4 x the limit.
SPREAD = {"requests_per_task": 5, "task_cpus": 0.5}


def limited_run(tmp_path, srv, limits: str, executor: str = "ray", **settings):
    spec = make_spec(tmp_path / executor, LIMITED_SPEC.format(api_base=srv.api_base, limits=limits))
    _, result = run(spec, tmp_path / f"{executor}-store", executor, make_registry(**{**SPREAD, **settings}))
    assert result.ok, result.report("answers").stats
    return result


def test_concurrency_holds_across_tasks(ray_instance, tmp_path):
    from tests.fakeserver import FakeServer

    with FakeServer(latency=0.1) as srv:
        local = limited_run(tmp_path, srv, "concurrency: 4", executor="local")
        srv.reset()
        remote = limited_run(tmp_path, srv, "concurrency: 4")
        assert srv.request_count == 40 and set(srv.attempts_by_prompt().values()) == {1}
        assert srv.max_in_flight == 4  # never more, and the limit was used
        assert table_bytes(local, "answers") == table_bytes(remote, "answers")
        srv.reset()
        again = limited_run(tmp_path, srv, "concurrency: 4")   # the journal and the cache are unchanged
        assert {n.status for n in again.nodes} == {"cached"} and srv.request_count == 0


def test_rpm_holds_across_tasks(ray_instance, tmp_path):
    from tests.fakeserver import FakeServer

    rate = 10  # rpm 600: 10 a second, at most one second's worth (10) in a burst
    with FakeServer(latency=0.01) as srv:
        limited_run(tmp_path, srv, f"rpm: {rate * 60}", requests_per_task=10)
        starts = sorted(r.t_start for r in srv.requests)
    assert len(starts) == 40
    assert starts[-1] - starts[0] >= (40 - rate) / rate * 0.9
    for i, s in enumerate(starts):  # never more than the burst plus a second's rate in any second
        in_window = sum(1 for x in starts[i:] if x - s < 1.0)
        assert in_window <= rate + rate + 1, in_window


def test_tpm_holds_across_tasks_and_usage_is_refunded(ray_instance, tmp_path):
    from tests.fakeserver import FakeServer, count_tokens

    # Each request reserves ceil(chars / 4) + max_tokens = 7 + 32 = 39 tokens and uses 11 (the server
    # counts words: 5 of prompt, 6 of answer). tpm 7200 = 120 a second, one second's worth in a burst.
    rate, n = 120, 40
    with FakeServer(latency=0.01) as srv:
        limited_run(tmp_path, srv, f"tpm: {rate * 60}", requests_per_task=8)
        records = sorted(srv.requests, key=lambda r: r.t_start)
    assert len(records) == n
    used = [(r.t_start, count_tokens(r.prompt) + count_tokens(f"echo: {r.prompt}")) for r in records]
    # 440 tokens at 120 a second after a burst of 120: over 2 s for the whole cluster (4 tasks each
    # with its own limit would take half a second)...
    span = records[-1].t_start - records[0].t_start
    assert span >= (sum(u for _, u in used) - rate - 39) / rate * 0.9
    for i, (s, _) in enumerate(used):
        in_window = sum(u for x, u in used[i:] if x - s < 1.0)
        assert in_window <= rate + rate + 39, in_window
    # ... and far less than the 12 s that 40 reservations of 39 tokens need: the usage was refunded.
    assert span < 8.0, span


class GatedBackend(ScriptedBackend):
    """A third-party backend with the optional LimitedBackend methods (litellm's RequestLimiter as its
    limiter). Each request holds a slot for 50 ms and logs when; the prompt 'die' kills the worker
    while it holds its slot."""

    name = "gated"

    def __init__(self, limiter=None):
        self.limiter = limiter

    def make_limiter(self, options):
        from specdsl.backends.litellm.backend import RequestLimiter

        return RequestLimiter(options["concurrency"], None, None) if options.get("concurrency") else None

    def with_limiter(self, limiter):
        return GatedBackend(limiter)

    def generate(self, options, requests, on_result):
        async def main():
            for r in requests:
                prompt = r.messages[-1]["content"]
                await self.limiter.acquire(1)
                start = time.time()
                if prompt == "die":
                    os._exit(3)
                await asyncio.sleep(0.05)
                with open(options["log"], "a") as f:
                    f.write(json.dumps([start, time.time(), os.getpid()]) + "\n")
                self.limiter.release(1, 1)
                on_result(GenResult(key=r.key, text=f"echo {prompt}"))

        asyncio.run(main())


def test_a_dead_task_gives_its_slot_back(ray_instance, tmp_path):
    from specdsl.executors.ray import RayExecutor

    backend = RayExecutor(requests_per_task=3, task_cpus=0.5).wrap_backend(GatedBackend())
    log = tmp_path / "held.log"
    reqs = _requests("a", "b", "c", "d", "die", "f", *[f"p{i}" for i in range(12)])
    got = {}
    # In a thread with a deadline: a slot never given back would hang the call (and ray.wait ignores
    # pytest-timeout's signal).
    call = threading.Thread(target=backend.generate, daemon=True,
                            args=({"concurrency": 1, "log": str(log)}, reqs, lambda r: got.setdefault(r.key, r)))
    call.start()
    call.join(90)
    assert not call.is_alive(), "generate hangs: the dead task's slot was never given back"
    # 'die' took the only slot and its worker died with it: without the slot back nothing after it runs
    assert set(got) == {r.key for r in reqs}
    assert {r.key for r in reqs[6:]} <= {k for k, r in got.items() if r.ok}
    held = sorted(json.loads(line) for line in log.read_text().splitlines())
    assert len({pid for _, _, pid in held}) >= 2   # several tasks took turns...
    for (_, end, _), (start, _, _) in zip(held, held[1:]):
        assert start >= end - 0.005               # ... never two requests at once


class LimiterlessWorkerBackend(GatedBackend):
    """Builds its limiter in the driver only: where the shared limiter lives (a Ray actor) it raises,
    as a backend missing a dependency on that node would."""

    name = "limiterless"
    driver_pid = 0

    def make_limiter(self, options):
        if os.getpid() != self.driver_pid:
            raise RunError("the limiter needs a library this node lacks", hint="install it on every node")
        return super().make_limiter(options)

    def with_limiter(self, limiter):
        return LimiterlessWorkerBackend(limiter)


def test_a_limiter_that_fails_on_the_cluster_is_the_same_run_error(ray_instance):
    from specdsl.executors.ray import RayExecutor

    LimiterlessWorkerBackend.driver_pid = os.getpid()
    backend = RayExecutor(requests_per_task=2).wrap_backend(LimiterlessWorkerBackend())
    with pytest.raises(RunError) as info:
        backend.generate({"concurrency": 2, "log": os.devnull}, _requests("a", "b", "c"), lambda r: None)
    assert str(info.value) == str(RunError("the limiter needs a library this node lacks",
                                           hint="install it on every node"))
