"""The store builds plain columns from buffers (execute/columns.py): the same arrays as ``pyarrow.array``,
and a run that only generates never imports pandas (pyarrow.array would, 0.3-1 s a run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pyarrow as pa
import pytest

from specdsl.execute.columns import plain_array, string_array
from specdsl.execute.store import read_table, write_table

CASES = {
    "str": ["a", "bé", "", "日本語", "x" * 1000],
    "str-null": [None, "a", None, "", "z"],
    "int": [0, -1, 2**63 - 1, -(2**63), 7],
    "int-null": [None, 3, None],
    "float": [0.5, -1e300, math.inf, 1.0],
    "float-null": [1.5, None, 2.0],
    "bool": [True, False, True, True, False, False, True, False, True],
    "bool-null": [None, True, False, None, True, None, None, False, True, None],
    "null": [None, None, None],
    "empty": [],
    "long": [f"row {i}" if i % 7 else None for i in range(20_003)],
    "long-int": [i if i % 5 else None for i in range(10_001)],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_plain_columns_equal_what_pyarrow_array_builds(name):
    values = CASES[name]
    built = plain_array(values)
    expected = pa.array(values)
    assert built is not None and built.type == expected.type
    built.validate(full=True)
    assert built.equals(expected) and built.null_count == expected.null_count
    assert built.to_pylist() == values


def test_nan_stays_a_value_as_with_pyarrow_array():
    built = plain_array([math.nan, None, 1.0])
    assert built.type == pa.array([math.nan, None, 1.0]).type
    assert built.null_count == 1 and math.isnan(built[0].as_py()) and built[2].as_py() == 1.0


@pytest.mark.parametrize("values", [[1, "a"], [1, 2.0], [True, 1], [[1], [2]], [{"a": 1}], [2**64], ["\ud800"],
                                    [b"bytes"], [1, None, 1.5]])
def test_anything_else_is_left_to_pyarrow(values):
    assert plain_array(values) is None


def test_string_array_of_json_text():
    for values in ([None, None], ['{"a": 1}', None], []):
        assert string_array(values).equals(pa.array(values, type=pa.string()))


def test_a_table_round_trips_through_the_store(tmp_path):
    rows = [{"id": f"r{i}", "n": i, "x": i / 3, "ok": i % 2 == 0, "msgs": [{"role": "user", "content": "hi"}],
             "maybe": None if i % 3 else "three", "mixed": 1 if i % 2 else "one"} for i in range(50)]
    json_columns = write_table(tmp_path / "t.parquet", rows)
    assert sorted(json_columns) == ["mixed", "msgs"]
    assert read_table(tmp_path / "t.parquet", json_columns) == rows


# `python -m specdsl.cli run <spec>` as a user runs it, telling at its exit whether pandas was imported. The
# program ends without the interpreter's teardown, after running atexit handlers: the report is one.
NO_PANDAS_RUN = """\
import atexit, runpy, sys
atexit.register(lambda: print('PANDAS', 'pandas' in sys.modules, flush=True))
sys.argv = ['specdsl', 'run', %r, '--no-progress']
runpy.run_module('specdsl.cli', run_name='__main__')
"""


def test_a_generation_run_does_not_import_pandas(tmp_path):
    """source -> generate -> store, in a fresh interpreter: pandas is never imported."""
    from tests.conftest import ROOT
    from tests.fakeserver import FakeServer

    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "q": f"question {i}"}) + "\n"
                                              for i in range(30)))
    with FakeServer() as srv:
        (tmp_path / "spec.yaml").write_text(f"""specdsl: 1
name: nopandas
models:
  m: {{backend: litellm, model: hosted_vllm/m, api_base: "{srv.api_base}"}}
sources:
  q: {{path: q.jsonl}}
steps:
  - id: a
    generate: {{from: q, model: m, user: "{{{{ row.q }}}}"}}
""")
        code = NO_PANDAS_RUN % str(tmp_path / "spec.yaml")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PANDAS False" in proc.stdout


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_transform_pipeline_with_export_does_not_import_pandas(tmp_path, fmt):
    """source -> filter -> map -> format -> export (the Arrow fast paths and the export writer), in a
    fresh interpreter: pandas is never imported (pyarrow.scalar and pyarrow.array would import it)."""
    from tests.conftest import ROOT

    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "n": i, "category": ["a", "b"][i % 2], "question": f"q{i}", "answer": str(i)})
        + "\n" for i in range(40)))
    (tmp_path / "spec.yaml").write_text(f"""specdsl: 1
name: nopandas
sources:
  rows: {{path: rows.jsonl}}
steps:
  - id: kept
    filter: {{from: rows, where: "{{{{ row.n % 3 != 0 }}}}"}}
  - id: tagged
    map: {{from: kept, columns: {{label: "{{{{ row.category }}}}-{{{{ row.n }}}}"}}}}
  - id: shaped
    format: {{from: tagged, user: "{{{{ row.question }}}}", assistant: "{{{{ row.answer }}}}"}}
  - id: out
    export: {{from: shaped, path: out, format: {fmt}, card: false}}
""")
    code = NO_PANDAS_RUN % str(tmp_path / "spec.yaml")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PANDAS False" in proc.stdout
    written = list((tmp_path / "out").glob(f"*.{fmt}"))
    assert written, list((tmp_path / "out").iterdir())


def test_a_batch_read_back_from_parquet_is_written_with_the_same_bytes_as_its_rows(tmp_path):
    # Parquet names a list's items 'element' where pyarrow.array says 'item'; the Arrow fast paths and Ray's
    # parts write batches read back from Parquet, so the writer names them one way (the Ray tier compares
    # local and Ray files byte for byte).
    import pyarrow.parquet as pq

    from specdsl.execute.batches import TableWriter

    rows = [{"id": f"r{i}", "tags": ["a", "b"][: i % 3], "n": i} for i in range(20)]
    write_table(tmp_path / "rows.parquet", rows)
    read_back = pq.ParquetFile(tmp_path / "rows.parquet").read()
    assert read_back.schema.field("tags").type.value_field.name == "element"
    for name, feed in (("from-rows", lambda w: w.write(rows)), ("from-arrow", lambda w: w.write_arrow(read_back))):
        (tmp_path / name).mkdir()
        writer = TableWriter(tmp_path / name)
        feed(writer)
        writer.close()
    assert (tmp_path / "from-rows" / "data.parquet").read_bytes() == \
        (tmp_path / "from-arrow" / "data.parquet").read_bytes()
