"""The Arrow fast paths give exactly what the row paths give.

filter, map and format run a stored batch vectorised (``run_arrow``, specdsl.ops.vectorised) where they
can reproduce Jinja exactly, and the export streams its input: every test here runs both ways on the
same input and compares the stored tables (schema, values, JSON-text columns), not just the rows.
"""

from __future__ import annotations

import json
import warnings

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from specdsl import api  # noqa: E402
from specdsl.contract.ops import Batch, RunContext  # noqa: E402
from specdsl.execute.store import _nested, rows_to_table  # noqa: E402
from specdsl.ops.filter import FilterOp, is_truthy  # noqa: E402
from specdsl.ops.format import FormatOp  # noqa: E402
from specdsl.ops.map import MapOp  # noqa: E402
from specdsl.ops.vectorised import condition_mask, render_column  # noqa: E402
from specdsl import templates  # noqa: E402

TEXTS = ["plain", "", "quote \" and \\ backslash", "line\nbreak\ttab\r\x00\x1f\x7f", "ünïcode ✓ 😀 \u2028",
         "  padded  ", "False", "0", None]
ROWS = [{"id": f"r{i}", "n": i * 7 - 20, "big": 2 ** 61 + i, "text": TEXTS[i % len(TEXTS)],
         "word": ["a", "b", "c"][i % 3], "flag": i % 2 == 0, "maybe": None if i % 4 else i,
         "score": i / 3, "nested": [{"k": i}] if i % 5 else "flat", "tags": ["x"] * (i % 3),
         "empty": None}
        for i in range(23)]
VARS = {"greeting": "Hi", "count": 3, "system": "Be brief.\n", "tilt": {"a": 1}}


def stored(rows):
    """A batch as the store hands it to an op: the rows written and read back as Arrow."""
    table, json_columns = rows_to_table(rows)
    return Batch.from_arrow(table, json_columns)


def context(params, rows=()):
    return RunContext(node_id="n", params=params, inputs={"from": list(rows)}, vars=dict(VARS), seed=0,
                      services=None, artifact_dir=None)


def assert_same(op, params, rows=ROWS, *, vectorised=True):
    batch = stored(rows)
    fast = op.run_arrow(context(params), batch)
    if not vectorised:
        assert fast is None, params
        return
    assert fast is not None, params
    slow_rows = op.run(context(params, batch.rows()))
    slow_table, slow_json = rows_to_table(slow_rows)
    fast_table, fast_json = fast.arrow()
    if not slow_rows:  # nothing to store either way (the table writer skips an empty batch)
        assert fast_table.num_rows == 0
        return
    assert fast_json == tuple(slow_json), params
    assert fast_table.schema.equals(slow_table.schema), (params, fast_table.schema, slow_table.schema)
    assert fast_table.equals(slow_table), params


TEMPLATES = ["{{ row.text }}", "{{ row.n }}", "{{ row['word'] }}-{{ row.flag }}", "{{ row.maybe }}",
             "{{ row.get('text') }}", "{{ row.get('absent', 'd') }}", "{{ row.get('absent') }}",
             "Q: {{ row.word ~ '?' ~ row.n }}", "{{ greeting }} {{ vars.count }} {{ vars['system'] }}",
             "{{ 'const' }}{{ 3 }}{{ none }}", "{{ row.empty }}", "{{ row.big }}", "{{ tilt }}",
             "plain text only", "{{ row.id }}\n"]
NOT_VECTORISED = ["{{ row.score }}", "{{ row.nested }}", "{{ row.tags }}", "{{ row.items }}", "{{ row.absent }}",
                  "{{ row.text | upper }}", "{% if row.flag %}y{% endif %}", "{{ undefined_var }}",
                  "{{ VARS_UNKNOWN }}", "{{ row[row.word] }}", "{{ tilt['a'] }}"]


@pytest.mark.parametrize("text", TEMPLATES)
def test_a_vectorised_template_renders_what_jinja_renders(text):
    batch = stored(ROWS)
    table, json_columns = batch.arrow()
    fast = render_column(text, table, json_columns, dict(VARS))
    assert fast is not None
    assert fast.to_pylist() == [templates._render_jinja(text, row, VARS) for row in batch.rows()]


@pytest.mark.parametrize("text", NOT_VECTORISED)
def test_what_the_fast_path_cannot_reproduce_is_left_to_jinja(text):
    table, json_columns = stored(ROWS).arrow()
    assert render_column(text, table, json_columns, dict(VARS)) is None


CONDITIONS = ["{{ row.n % 3 != 0 }}", "{{ row.n % 4 }}", "{{ row.n // 3 > -2 }}", "{{ not row.flag }}",
              "{{ row.flag and row.n > 0 }}", "{{ row.flag or row.n == -20 }}", "{{ -5 < row.n <= 30 }}",
              "{{ row.word == 'a' }}", "{{ 'b' != row.word }}", "{{ row.n + count > 10 }}",
              "{{ row.n - 1 >= vars.count }}", " {{ row.flag }} ", "{{ not row.n % 2 }}", "{{ row.n % -3 == -1 }}",
              "{{ row.big % 5 == 1 }}"]
CONDITIONS_NOT_VECTORISED = ["{{ row.text }}", "{{ row.maybe > 2 }}", "{{ row.n % row.n }}", "{{ row.n % 0 }}",
                             "{{ row.n and row.flag }}", "{{ row.word < 'b' }}", "{{ row.score > 1 }}",
                             "yes {{ row.flag }}", "{{ row.big * 2 > 0 }}", "{{ row.n in [1, 2] }}",
                             "{{ row.n == 'x' }}"]


@pytest.mark.parametrize("text", CONDITIONS)
def test_a_vectorised_condition_is_truthy_where_the_rendered_text_is(text):
    batch = stored(ROWS)
    table, json_columns = batch.arrow()
    mask = condition_mask(text, table, json_columns, dict(VARS))
    assert mask is not None
    assert mask.tolist() == [is_truthy(templates._render_jinja(text, row, VARS)) for row in batch.rows()]


@pytest.mark.parametrize("text", CONDITIONS_NOT_VECTORISED)
def test_conditions_the_fast_path_cannot_reproduce_are_left_to_jinja(text):
    table, json_columns = stored(ROWS).arrow()
    assert condition_mask(text, table, json_columns, dict(VARS)) is None


@pytest.mark.parametrize("params", [
    {"where": "{{ row.n % 3 != 0 }}"}, {"where": "{{ row.flag }}", "keep": "unmatched"},
    {"where": "{{ row.n > 1000 }}"}, {"where": "{{ row.word == 'b' }}", "into": "is_b"},
    {"where": "{{ row.flag }}", "into": "flag"}, {"where": "{{ row.n % 5 == 0 }}"},
])
def test_filter_fast_path_stores_the_same_table(params):
    assert_same(FilterOp(), {"from": "x", **params})


def test_filter_with_a_matcher_or_a_text_condition_runs_row_by_row():
    assert_same(FilterOp(), {"from": "x", "match": {"field": "word", "gold": "word"}}, vectorised=False)
    assert_same(FilterOp(), {"from": "x", "where": "{{ row.text }}"}, vectorised=False)


@pytest.mark.parametrize("columns", [{"label": "{{ row.word }}"}, {"text": "{{ row.n }}!", "n": "{{ row.text }}"},
                                     {"nested": "{{ row.id }}"}, {"empty": "{{ greeting }}", "new": "{{ row.flag }}"}])
def test_map_fast_path_stores_the_same_table(columns):
    assert_same(MapOp(), {"from": "x", "columns": columns})


def test_map_with_a_template_jinja_must_render_runs_row_by_row():
    assert_same(MapOp(), {"from": "x", "columns": {"a": "{{ row.word }}", "b": "{{ row.text | upper }}"}},
                vectorised=False)


@pytest.mark.parametrize("params", [
    {"user": "{{ row.text }}", "assistant": "{{ row.n }}"},
    {"system": "{{ vars.system }}", "user": "Q: {{ row.word }} \"{{ row.id }}\"", "assistant": "{{ row.text }}"},
    {"to": "prompt_completion", "prompt": "{{ row.text }}", "completion": "{{ row.flag }}"},
])
def test_format_fast_path_stores_the_same_table(params):
    assert_same(FormatOp(), {"from": "x", **params})
    # and over a table that already has a messages column (replaced in place)
    rows = [{**r, "messages": [{"role": "user", "content": "old"}]} for r in ROWS]
    assert_same(FormatOp(), {"from": "x", **params}, rows)


def test_the_store_nested_check_by_arrow_type_matches_the_check_per_value():
    columns = [[{"a": 1}, None], [[{"a": 1}], []], [["a"], [], None], [[[1]], None], [[], None], [[None]],
               ["x", None], [1, 2], [None, None], [[1, 2], [3]], [{}], [[[]]], [[], ["a"]]]
    for values in columns:
        table, json_columns = rows_to_table([{"c": v} for v in values])
        assert ("c" in json_columns) == any(_nested(v) for v in values), values


EXPORT_SPEC = """\
specdsl: 1
name: exporting
sources:
  rows: {{path: rows.jsonl}}
steps:
  - id: shaped
    format: {{from: rows, user: "{{{{ row.text }}}}", assistant: "{{{{ row.n }}}}"}}
  - id: out
    export: {{from: {src}, path: out, format: {fmt}{extra}}}
"""


def _export(tmp_path, monkeypatch, rows, *, fmt, batch_rows, src="shaped", extra=""):
    from specdsl.plugins import build_registry

    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    if batch_rows:
        monkeypatch.setenv("SPECDSL_BATCH_ROWS", str(batch_rows))
    else:
        monkeypatch.delenv("SPECDSL_BATCH_ROWS", raising=False)
    folder = tmp_path / f"{fmt}-{batch_rows}-{src}"
    folder.mkdir(parents=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "spec.yaml").write_text(EXPORT_SPEC.format(src=src, fmt=fmt, extra=extra))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        registry = build_registry()
    plan = api.compile_spec(folder / "spec.yaml", registry=registry)
    result = api.run_plan(plan, store_dir=folder / ".specdsl", registry=registry, progress=False)
    assert result.ok, [n.to_dict() for n in result.nodes]
    _export.result = result
    return folder / "out"


def _card(folder):
    text = (folder / "README.md").read_text()
    return "\n".join(line for line in text.splitlines() if "num_bytes" not in line and "dataset_size" not in line)


EXPORT_ROWS = [
    # a column all null in the first batches and text later; an optional nested column; tokens
    [{"id": f"r{i}", "n": i, "text": f"t{i}", "late": None if i < 7 else f"l{i}", "n_tokens": i, "n_trained": i // 2,
      "parts": None if i % 3 else [{"type": "text", "text": str(i)}]} for i in range(11)],
    # a column integer in some batches and text in others: converted whole (the documented limit)
    [{"id": f"r{i}", "n": i, "text": "x", "mixed": i if i < 5 else f"s{i}"} for i in range(9)],
    # a column JSON text only in some batches
    [{"id": f"r{i}", "n": i, "text": "y", "content": "plain" if i < 6 else [{"type": "text"}]} for i in range(9)],
]


# The first case in the fast tier (a column typed late, nested values, token counts); the rest are slow.
EXPORT_CASES = [(0, "shaped", "")] + [
    pytest.param(i, src, extra, marks=pytest.mark.slow) for i in range(3) for src in ("shaped", "rows")
    for extra in ("", ", columns: [text, id, n, text]") if (i, src, extra) != (0, "shaped", "")]


@pytest.mark.parametrize("case, src, extra", EXPORT_CASES)
def test_a_streamed_export_writes_what_a_whole_table_export_writes(tmp_path, monkeypatch, case, src, extra):
    rows = EXPORT_ROWS[case]
    parquet_small = _export(tmp_path / f"a{len(extra)}", monkeypatch, rows, fmt="parquet", batch_rows=3, src=src,
                            extra=extra)
    parquet_whole = _export(tmp_path / f"a{len(extra)}", monkeypatch, rows, fmt="parquet", batch_rows=None,
                            src=src, extra=extra)
    small, whole = (pq.ParquetFile(f / "data.parquet").read() for f in (parquet_small, parquet_whole))
    assert small.schema.equals(whole.schema) and small.equals(whole)
    assert _card(parquet_small) == _card(parquet_whole)
    jsonl_small = _export(tmp_path / f"b{len(extra)}", monkeypatch, rows, fmt="jsonl", batch_rows=3, src=src,
                          extra=extra)
    jsonl_whole = _export(tmp_path / f"b{len(extra)}", monkeypatch, rows, fmt="jsonl", batch_rows=None, src=src,
                          extra=extra)
    assert (jsonl_small / "data.jsonl").read_bytes() == (jsonl_whole / "data.jsonl").read_bytes()
    assert (jsonl_small / "README.md").read_text() == (jsonl_whole / "README.md").read_text()


@pytest.mark.parametrize("src", ["rows", "shaped"])
def test_a_one_batch_parquet_export_is_byte_for_byte_a_whole_table_write(tmp_path, monkeypatch, src):
    from specdsl.ops.export import arrow_table

    out = _export(tmp_path, monkeypatch, EXPORT_ROWS[0], fmt="parquet", batch_rows=None, src=src)
    table, _json = arrow_table(_export.result.rows(src))  # what the export wrote before it streamed
    pq.write_table(table, tmp_path / "whole.parquet")
    assert (out / "data.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()


@pytest.mark.parametrize("values", [
    [[{"role": "user", "content": "a\n\"é😀"}, {"role": "assistant", "content": "b"}], None, []],
    [[{"role": "user"}], [{"role": "user", "content": None}, None]],
    [[{"content": "x", "role": "user"}], [{"role": "user", "content": "y"}]],
    [[{"role": "user", "content": "x"}], [{"role": "user", "content": 3}]],
    [[{"role": "user", "content": "x"}], [{"role": "user", "content": "y", "name": "z"}]],
    [[{"type": "text", "text": "x"}], "plain", [{"type": "text", "text": "y"}]],
    ["plain", "text"], [{"a": {"b": ["c"]}}, {"a": {"b": None}}], [[{"a": 1}]], [[], [{"a": "x"}]],
    [{"a": "2020-01-01"}, {"a": "1"}],
])
def test_a_json_text_column_parsed_by_arrow_is_what_python_would_type(values):
    from specdsl.ops.export import _typed, export_batch

    batch = stored([{"id": str(i), "c": v} for i, v in enumerate(values)])
    table, json_columns, _rows = export_batch(batch, None)
    expected, as_json = _typed([v for v in values])
    assert ("c" in json_columns) == as_json
    assert table.column("c").type.equals(expected.type)
    assert table.column("c").to_pylist() == expected.to_pylist()


def _line_by_line(path, limit=None):
    """The JSON-lines read before lines were parsed in chunks: one json call per line."""
    from specdsl.errors import RunError
    from specdsl.sources.files import _line_error, parse_json_line

    rows = []
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = parse_json_line(line, lineno, "d.jsonl", _line_error)
            if not isinstance(row, dict):
                raise RunError(f"d.jsonl:{lineno}: each line must be a JSON object, not {type(row).__name__}")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


GOOD = [json.dumps({"id": f"r{i}", "t": "é\n" * (i % 3), "x": [i, None, 1.5]}).encode() for i in range(11)]


@pytest.mark.parametrize("lines, limit", [
    (GOOD, None), (GOOD, 4), (GOOD[:5] + [b"", b"   "] + GOOD[5:], None),
    (GOOD[:6] + [b'{"a": 1'] + GOOD[6:], None), (GOOD[:6] + [b'{"a": 1'] + GOOD[6:], 6),
    (GOOD[:3] + [b"[1, 2]"] + GOOD[3:], None), (GOOD[:3] + [b'{"a": 1}, {"b": 2}'] + GOOD[3:], None),
    (GOOD[:3] + [b'{"a": 1} {"b": 2}'] + GOOD[3:], None), (GOOD[:2] + [b'{"a": "\xff"}'] + GOOD[2:], None),
    (GOOD[:2] + [b'{"a": "\xed\xa0\x80"}'] + GOOD[2:], None), ([b"\xef\xbb\xbf" + GOOD[0]] + GOOD[1:], None),
    (GOOD[:4] + [b"1e999999", b'{"n": NaN}'] + GOOD[4:], None), (GOOD[:4] + [b"\x0c{}"], None),
    (GOOD[:4] + [b"[" * 5000 + b"]" * 5000], None), ([b'{"n": ' + b"9" * 5000 + b"}"], None),
])
def test_json_lines_parsed_in_chunks_read_what_line_by_line_reads(tmp_path, monkeypatch, lines, limit):
    from specdsl.errors import RunError
    from specdsl.sources import files

    monkeypatch.setattr(files, "_JSONL_LINES_PER_PARSE", 4)
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        expected = _line_by_line(path, limit)
    except RunError as exc:
        expected = ("error", exc.message if hasattr(exc, "message") else str(exc))
    try:
        got = list(files._jsonl_records(path, limit, "d.jsonl"))
    except RunError as exc:
        got = ("error", exc.message if hasattr(exc, "message") else str(exc))
    assert repr(got) == repr(expected)  # repr: NaN equals itself there
