"""Row-parallel nodes stream through Ray Data, and give the local executor's tables.

* a spec with every built-in row-parallel op (filter with ``where`` and with ``match``, with and without
  ``into``; map; format to chats and to prompt/completion; erase_prompt; pam; segment per segment and per
  text; tokenize of chats and of prompt/completion pairs, on the tiny model's tokenizer, which the workers
  load from its folder) gives byte-identical tables under ``--executor local`` and ``--executor ray``, in
  many batches, reading inputs from the store (row groups of a batch, and a table committed whole) and from
  memory (an upstream ``concat``);
* tokenize's whole-table check (no sample carries loss) gives the local error on Ray, from the workers'
  per-batch counts;
* on Ray, an op sees exactly the local executor's batches, never more than a batch of rows, in Ray
  worker processes; the driver holds neither the input nor the output table;
* an op's error in a streamed batch is the local executor's RunError; the staging parts never reach the
  committed node.

Ray starts once for the module (about 10 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'specdsl[ray]')")
pq = pytest.importorskip("pyarrow.parquet")

from specdsl import api  # noqa: E402
from specdsl.contract.hookspecs import hookimpl  # noqa: E402
from specdsl.contract.ops import STEP_REF, StepOp, obj_schema  # noqa: E402
from specdsl.errors import RunError  # noqa: E402
from specdsl.plugins import build_registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class SeenOp(StepOp):
    """Row-parallel: stamps each row with the size of the batch it came in and the process that ran it."""

    name = "seen"
    row_parallel = True
    params_schema = obj_schema({"from": STEP_REF}, required=["from"])

    def check(self, ctx):
        return tuple(ctx.columns) + ("batch", "pid")

    def run(self, ctx):
        return [{**row, "batch": len(ctx.rows), "pid": os.getpid()} for row in ctx.rows]


class CrashOp(StepOp):
    """Row-parallel: the process that meets row ``id`` dies (a segfault, the OOM killer)."""

    name = "crash"
    row_parallel = True
    params_schema = obj_schema({"from": STEP_REF, "id": {"type": "string"}}, required=["from", "id"])

    def check(self, ctx):
        return tuple(ctx.columns)

    def run(self, ctx):
        if any(row["id"] == ctx.params["id"] for row in ctx.rows):
            os._exit(1)
        return ctx.rows


class SeenPlugin:
    @staticmethod
    @hookimpl
    def register_ops(register):
        register(SeenOp())
        register(CrashOp())


@pytest.fixture(scope="module")
def ray_instance():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers unpickle SeenOp by value
    from specdsl.executors.ray import ensure_ray

    started_here = not ray.is_initialized()
    ensure_ray(num_cpus=2)
    yield ray
    if started_here:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _only_builtins(monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


CATEGORIES = ("addition", "subtraction", "multiplication", "word_problem")


def write_problems(path: Path, n: int, start: int = 0) -> None:
    with path.open("w") as f:
        for i in range(start, start + n):
            a, b, cat = 3 * i + 1, 7 * i % 11, CATEGORIES[i % 4]
            f.write(json.dumps({
                "id": f"q{i:04d}", "a": a, "b": b, "category": cat,
                "question": f"What is {a} plus {b}?", "answer": str(a + b),
                # a nested column: stored as JSON text, decoded in the workers as the store decodes it
                "response_prompt": [{"role": "system", "content": f"Strategy for {cat}: add carefully."},
                                    {"role": "user", "content": f"What is {a} plus {b}? ünïcode ✓"}],
                "weight": i / 7 if i % 5 else None,
            }) + "\n")


EVERY_OP_SPEC = """\
specdsl: 1
name: ray-every-row-op
seed: 5
models:
  student: {backend: transformers, model: MODEL}
sources:
  problems: {path: problems.jsonl}
  more: {path: more.jsonl}
vars:
  greeting: "Solve:"
steps:
  - id: answered
    map:
      from: problems
      columns:
        response: "Reasoning for {{ row.id }}. Answer: {{ row.a + row.b if row.a % 5 else row.a }}"
        initial_answer: "So the answer is {{ row.a + row.b if row.b % 3 else row.a }}"
        corrected_answer: "Checking again, the answer is {{ row.a + row.b }}"
  - id: right
    filter: {from: answered, match: {field: response, gold: answer, rule: number}}
  - id: verdicts
    filter: {from: answered, where: "{{ row.a % 3 == 1 }}", into: odd_one}
  - id: odd
    filter: {from: verdicts, where: "{{ row.odd_one and row.b > 2 }}"}
  - id: erased
    erase_prompt: {from: right, generic_system: "You are a helpful assistant."}
  - id: corrections
    pam: {from: answered, system: "Check your work."}
  - id: pairs
    format:
      from: right
      to: prompt_completion
      prompt: "{{ vars.greeting }} {{ row.question }}"
      completion: "{{ row.response }}"
  - id: chats
    format:
      from: odd
      system: "You answer arithmetic."
      user: "{{ row.question }}"
      assistant: "{{ row.response }} ({{ row.odd_one }})"
  - id: both
    concat: {from: [problems, more]}
  - id: both_answered
    map: {from: both, columns: {response: "{{ row.a * STEP }}"}}
  - id: both_right
    filter: {from: both_answered, where: "{{ row.a % 4 != 0 }}"}
  - id: segments
    segment: {from: answered, text: response, model: student, min_tokens: 4}
  - id: documents
    segment: {from: odd, text: question, model: student, min_tokens: 3, per: text}
  - id: chat_tokens
    tokenize: {from: chats, model: student}
  - id: pair_tokens
    tokenize: {from: pairs, model: student, max_length: MAX_LENGTH}
  - id: everything    # the last step: keeps every step above in the plan
    concat: {from: [erased, corrections, pairs, chats, both_right, segments, documents, chat_tokens, pair_tokens]}
"""
ROW_NODES = ["answered", "right", "verdicts", "odd", "erased", "corrections", "pairs", "chats", "both_answered",
             "both_right", "segments", "documents", "chat_tokens", "pair_tokens"]


def make_spec(folder: Path, model: Path, step: int = 2, rows: int = 300, max_length: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_problems(folder / "problems.jsonl", rows)
    write_problems(folder / "more.jsonl", 37, start=rows)
    path = folder / "spec.yaml"
    path.write_text(EVERY_OP_SPEC.replace("STEP", str(step)).replace("MODEL", str(model))
                    .replace("MAX_LENGTH", str(max_length)))
    return path


def run(spec: Path, store: Path, executor: str, registry=None):
    registry = registry or build_registry()
    plan = api.compile_spec(spec, registry=registry)
    result = api.run_plan(plan, store_dir=store, executor=executor, registry=registry, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    return result


def table_path(result, node_id: str) -> Path:
    return result.store.node_dir(result.plan.node(node_id).fingerprint) / "data.parquet"


def assert_same_tables(local, remote, node_ids):
    for node_id in node_ids:
        assert remote.report(node_id).status == "ran", node_id
        a, b = pq.read_table(table_path(local, node_id)), pq.read_table(table_path(remote, node_id))
        assert a.schema == b.schema, node_id
        assert a.to_pylist() == b.to_pylist(), node_id                      # row by row, ids and order
        assert table_path(local, node_id).read_bytes() == table_path(remote, node_id).read_bytes(), node_id
        assert local.store.meta(local.plan.node(node_id).fingerprint)["json_columns"] == \
            remote.store.meta(remote.plan.node(node_id).fingerprint)["json_columns"], node_id


def test_every_row_parallel_op_gives_the_local_tables(ray_instance, tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("SPECDSL_BATCH_ROWS", "16")  # 300 rows: 19 batches, ragged after each filter
    local = run(make_spec(tmp_path / "local", tiny_model_dir), tmp_path / "local-store", "local")
    remote = run(make_spec(tmp_path / "ray", tiny_model_dir), tmp_path / "ray-store", "ray")
    assert_same_tables(local, remote, ROW_NODES)
    assert len(remote.rows("segments")) > 300 and remote.rows("chat_tokens")[0]["n_trained"] > 0
    assert local.plan.node("answered").fingerprint == remote.plan.node("answered").fingerprint
    rows = remote.rows("answered")
    assert [r["id"] for r in rows] == [f"q{i:04d}" for i in range(300)]
    assert 0 < len(remote.rows("right")) < 300 and 0 < len(remote.rows("odd")) < len(remote.rows("verdicts"))
    assert {r["case"] for r in remote.rows("corrections")} >= {"good", "bad"}
    # no staging part survives into a committed node
    assert not [p for p in (tmp_path / "ray-store" / "nodes").rglob("*") if ".ray-parts" in str(p) or
                p.name.startswith(".part-")]

    # `both` (a concat) was committed whole, one row group of 337 rows: a changed step after it reads
    # that table from the store in spans of several batches, and still sees the local batches.
    local = run(make_spec(tmp_path / "local", tiny_model_dir, step=3), tmp_path / "local-store", "local")
    remote = run(make_spec(tmp_path / "ray", tiny_model_dir, step=3), tmp_path / "ray-store", "ray")
    assert remote.report("both").status == "cached"
    assert pq.ParquetFile(table_path(remote, "both")).num_row_groups == 1
    assert_same_tables(local, remote, ["both_answered", "both_right"])


def test_a_streamed_node_sees_one_batch_at_a_time_in_the_workers(ray_instance, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDSL_BATCH_ROWS", "32")
    write_problems(tmp_path / "problems.jsonl", 1000)
    (tmp_path / "spec.yaml").write_text(
        "specdsl: 1\nname: seen\nsources:\n  problems: {path: problems.jsonl}\nsteps:\n"
        "  - id: kept\n    filter: {from: problems, where: \"{{ row.a % 7 != 0 }}\"}\n"
        "  - id: stamped\n    seen: {from: kept}\n")
    registry = build_registry(extra_plugins=(SeenPlugin(),))
    local = run(tmp_path / "spec.yaml", tmp_path / "local-store", "local", registry)
    remote = run(tmp_path / "spec.yaml", tmp_path / "ray-store", "ray", registry)
    local_rows, ray_rows = local.rows("stamped"), remote.rows("stamped")
    assert [r["batch"] for r in ray_rows] == [r["batch"] for r in local_rows]  # the same batches
    assert max(r["batch"] for r in ray_rows) == 32 and len(ray_rows) > 20 * 32  # many of them, none larger
    assert [{k: v for k, v in r.items() if k != "pid"} for r in ray_rows] == \
        [{k: v for k, v in r.items() if k != "pid"} for r in local_rows]
    pids = [r["pid"] for r in ray_rows]
    assert os.getpid() not in pids                                      # run in Ray workers ...
    assert all(len(set(pids[i:i + 32])) == 1 for i in range(0, len(pids), 32))  # ... a batch per call
    assert pq.ParquetFile(table_path(remote, "stamped")).num_row_groups == len(range(0, len(pids), 32))


def test_an_op_error_in_a_streamed_batch_is_the_local_run_error(ray_instance, tmp_path, monkeypatch,
                                                                tiny_model_dir):
    monkeypatch.setenv("SPECDSL_BATCH_ROWS", "16")
    spec = make_spec(tmp_path / "spec", tiny_model_dir)
    spec.write_text(spec.read_text().replace("{{ row.a + row.b if row.a % 5 else row.a }}",
                                             "{{ 100 // (row.a - 271) }}"))
    errors = {}
    for executor in ("local", "ray"):
        with pytest.raises(RunError) as info:
            run(spec, tmp_path / f"{executor}-store", executor)
        errors[executor] = info.value
    assert str(errors["ray"]) == str(errors["local"]) and errors["ray"].node == "answered"
    assert "q0090" in str(errors["ray"]) and "Traceback" not in str(errors["ray"])
    assert not list((tmp_path / "ray-store" / "tmp").iterdir())  # the staging folder went with the error


def test_no_trained_token_in_any_streamed_batch_is_the_local_run_error(ray_instance, tmp_path, monkeypatch,
                                                                      tiny_model_dir):
    """Every pair's prompt fills max_length: tokenize's whole-table check fails from the workers' counts."""
    monkeypatch.setenv("SPECDSL_BATCH_ROWS", "16")
    spec = make_spec(tmp_path / "spec", tiny_model_dir, max_length=8)
    errors = {}
    for executor in ("local", "ray"):
        with pytest.raises(RunError) as info:
            run(spec, tmp_path / f"{executor}-store", executor)
        errors[executor] = info.value
    assert str(errors["ray"]) == str(errors["local"]) and errors["ray"].node == "pair_tokens"
    assert errors["ray"].message == "no token carries loss in any sample"
    assert not list((tmp_path / "ray-store" / "tmp").iterdir())  # the staging folder went with the error


def test_a_batch_that_kills_its_worker_fails_the_node_after_retries(ray_instance, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDSL_BATCH_ROWS", "16")
    write_problems(tmp_path / "problems.jsonl", 64)
    (tmp_path / "spec.yaml").write_text(
        "specdsl: 1\nname: crash\nsources:\n  problems: {path: problems.jsonl}\nsteps:\n"
        "  - id: doomed\n    crash: {from: problems, id: q0040}\n")
    registry = build_registry(extra_plugins=(SeenPlugin(),))
    plan = api.compile_spec(tmp_path / "spec.yaml", registry=registry)
    with pytest.raises(RunError) as info:
        api.run_plan(plan, store_dir=tmp_path / "store", executor="ray", registry=registry, progress=False)
    assert "Ray Data task" in str(info.value) and "Traceback" not in str(info.value)
    assert not (tmp_path / "store" / "nodes" / plan.node("doomed").fingerprint[:2]).exists()  # nothing committed


def test_the_cli_runs_row_ops_on_ray(tmp_path, tiny_model_dir):
    """`specdsl run --executor ray` from a shell, on its own private Ray instance."""
    spec = make_spec(tmp_path, tiny_model_dir, rows=60)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECDSL_BATCH_ROWS": "8", "SPECDSL_RAY_NUM_CPUS": "2"}
    for executor in ("local", "ray"):
        out = subprocess.run([sys.executable, "-m", "specdsl", "run", str(spec), "--executor", executor,
                              "--store", str(tmp_path / f"{executor}-store"), "--no-progress"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Traceback" not in out.stderr and "ray.data" not in out.stderr, out.stderr[-3000:]
    plan = api.compile_spec(spec)
    for node_id in ROW_NODES:
        fingerprint = plan.node(node_id).fingerprint[:2] + "/" + plan.node(node_id).fingerprint
        a = tmp_path / "local-store" / "nodes" / fingerprint / "data.parquet"
        b = tmp_path / "ray-store" / "nodes" / fingerprint / "data.parquet"
        assert pq.read_table(a).to_pylist() == pq.read_table(b).to_pylist(), node_id
