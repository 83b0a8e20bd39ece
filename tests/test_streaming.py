"""Tables stream: sources read in batches, row-parallel ops run a batch at a time, the store writes each
batch as it comes, and the tables are the same as a whole-table run's."""

from __future__ import annotations

import json
import types
import warnings

import pytest

from specdsl import api
from specdsl.contract.hookspecs import hookimpl
from specdsl.contract.ops import STEP_REF, StepOp, obj_schema
from specdsl.errors import RunError
from specdsl.execute.batches import TableWriter
from specdsl.execute.store import read_batches, read_table
from specdsl.plugins import build_registry
from specdsl.sources.files import iter_row_batches


class BatchSizes(StepOp):
    """Row-parallel: records the size of every batch it is handed."""

    name = "batch_sizes"
    row_parallel = True
    params_schema = obj_schema({"from": STEP_REF}, required=["from"])
    seen: list[int] = []

    def check(self, ctx):
        return ctx.columns + ("doubled",)

    def run(self, ctx):
        BatchSizes.seen.append(len(ctx.rows))
        return [{**r, "doubled": 2 * len(r["id"])} for r in ctx.rows]


SPEC = """\
specdsl: 1
name: streaming
sources:
  rows: {path: rows.jsonl}
steps:
  - id: kept
    filter: {from: rows, where: "{{ row.n % 3 != 0 }}"}
  - id: shaped
    format: {from: kept, user: "{{ row.text }}", assistant: "{{ row.n }}"}
  - id: sized
    batch_sizes: {from: shaped}
"""


def _run(tmp_path, monkeypatch, batch_rows: int | None, store: str):
    if batch_rows:
        monkeypatch.setenv("SPECDSL_BATCH_ROWS", str(batch_rows))
    else:
        monkeypatch.delenv("SPECDSL_BATCH_ROWS", raising=False)
    mod = types.ModuleType("sizes_plugin")
    mod.register_ops = hookimpl(lambda register: register(BatchSizes()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        registry = build_registry(extra_plugins=(mod,))
    BatchSizes.seen = []
    plan = api.compile_spec(tmp_path / "spec.yaml", registry=registry)
    result = api.run_plan(plan, store_dir=tmp_path / store, registry=registry, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    return result


def test_batches_give_the_same_tables_as_whole_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    texts = ["plain", "ünïcode ✓", "", "x" * 300]
    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "n": i, "text": texts[i % 4]}) + "\n" for i in range(25)))
    (tmp_path / "spec.yaml").write_text(SPEC)
    small = _run(tmp_path, monkeypatch, 4, "store-small")
    assert BatchSizes.seen == [4, 4, 4, 4]  # 16 kept rows, read back from the store 4 at a time
    whole = _run(tmp_path, monkeypatch, None, "store-whole")
    assert BatchSizes.seen == [16]
    for node in ("rows", "kept", "shaped", "sized"):
        assert small.rows(node) == whole.rows(node), node
    fp = small.plan.node("shaped").fingerprint
    assert small.store.meta(fp)["rows"] == 16
    # Written a batch at a time: one row group per batch.
    import pyarrow.parquet as pq

    assert pq.ParquetFile(small.store.node_dir(fp) / "data.parquet").num_row_groups == 4
    assert [len(b) for b in small.store.iter_batches(fp, 10)] == [10, 6]


def test_a_column_json_in_one_batch_and_plain_in_another_is_json_throughout(tmp_path):
    pytest.importorskip("pyarrow")
    writer = TableWriter(tmp_path)
    writer.write([{"id": "a", "content": "text", "extra": None}])
    writer.write([{"id": "b", "content": [{"type": "text", "text": "hi"}], "extra": 3}])
    writer.write([{"id": "c", "content": None}])
    json_columns = writer.close()
    assert json_columns == ["content"]
    rows = read_table(tmp_path / "data.parquet", json_columns)
    assert rows == [{"id": "a", "content": "text", "extra": None},
                    {"id": "b", "content": [{"type": "text", "text": "hi"}], "extra": 3},
                    {"id": "c", "content": None, "extra": None}]
    assert [r for b in read_batches(tmp_path / "data.parquet", json_columns, 2) for r in b] == rows
    assert not list(tmp_path.glob(".part-*"))


def test_source_batches_check_ids_across_batches(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": k}) + "\n" for k in ["a", "b", "c", "a"]))
    batches = iter_row_batches(path, "jsonl", size=2)
    assert [r["id"] for r in next(batches)] == ["a", "b"]
    with pytest.raises(RunError, match="id 'a' appears more than once"):
        next(batches)
    numbered = tmp_path / "n.csv"
    numbered.write_text("x\n1\n2\n3\n")
    assert [[r["id"] for r in b] for b in iter_row_batches(numbered, "csv", size=2)] == [["0", "1"], ["2"]]


def test_ids_kept_as_hashes_are_checked_exactly_even_when_hashes_collide(tmp_path):
    """Ids are remembered as 64-bit hashes; a hash seen before is confirmed by reading the ids before it
    again. With a hash that collides for every id of the same length, distinct ids still pass and a
    real repeat still raises, at the batch that holds it."""
    from specdsl.sources.ids import IdAssigner

    records = [{"id": k} for k in ["ab", "cd", "ef", "gh", "ij", "cd", "kl"]]
    ids = IdAssigner(None, "d.jsonl", reread=lambda: iter(records), hash_id=len)
    assert [r["id"] for r in ids.assign(records[:2])] == ["ab", "cd"]
    assert [r["id"] for r in ids.assign(records[2:5])] == ["ef", "gh", "ij"]  # same hashes, other ids
    with pytest.raises(RunError, match="id 'cd' appears more than once"):
        ids.assign(records[5:])
    # A repeat inside one batch, and row numbers (no id column) that never repeat.
    same = IdAssigner(None, "d.jsonl", reread=lambda: iter([{"id": "x"}, {"id": "y"}, {"id": "x"}]), hash_id=len)
    with pytest.raises(RunError, match="id 'x' appears more than once"):
        same.assign([{"id": "x"}, {"id": "y"}, {"id": "x"}])
    numbered = IdAssigner(None, "n.csv", reread=lambda: iter([{}] * 30), hash_id=lambda s: 7)
    assert [r["id"] for b in range(3) for r in numbered.assign([{}] * 10)] == [str(i) for i in range(30)]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "parquet_dir"])
def test_every_reader_confirms_a_repeated_id_across_batches(tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from specdsl.plugins import default_registry

    keys = [f"k{i}" for i in range(50)] + ["k7"]
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"id": k, "n": i}) + "\n" for i, k in enumerate(keys)))
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        path.write_text("id,n\n" + "".join(f"{k},{i}\n" for i, k in enumerate(keys)))
    else:
        table = pa.table({"id": keys, "n": list(range(len(keys)))})
        path = tmp_path / ("d.parquet" if fmt == "parquet" else "d")
        if fmt == "parquet_dir":
            path.mkdir()
            pq.write_table(table.slice(0, 30), path / "a.parquet")
            pq.write_table(table.slice(30), path / "b.parquet")
        else:
            pq.write_table(table, path)
    reader = default_registry().sources[fmt]
    with pytest.raises(RunError, match="id 'k7' appears more than once"):
        for _ in reader.iter_batches(path, size=16, display=path.name):
            pass
    # Without the repeat every row comes through, in order.
    assert [r["id"] for b in reader.iter_batches(path, size=16, limit=50, display=path.name) for r in b] == keys[:50]
