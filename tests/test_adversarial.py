"""Adversarial inputs (issue 14, item 9 and 14): a broken store, hostile or malformed data files, values
that validate must bound, and small front-end positions. Every case must end in a clear message (a
positioned error at validate, or a RunError naming the file and row at run), never a traceback or a hang.

Runs go through the API or `specdsl` subprocesses; nothing of specdsl's is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specdsl import api
from specdsl.errors import RunError
from tests.conftest import ROOT

TRANSFORM_SPEC = """\
specdsl: 1
name: adversarial
sources:
  rows: {path: rows.jsonl}
steps:
  - id: doubled
    map: {from: rows, columns: {q2: "{{ row.q }}{{ row.q }}"}}
"""


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "specdsl", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def transform_spec(tmp_path: Path) -> Path:
    (tmp_path / "rows.jsonl").write_text('{"id":"a","q":"x"}\n{"id":"b","q":"y"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(TRANSFORM_SPEC)
    return spec


def node_dir(tmp_path: Path, node: str) -> Path:
    plan = api.compile_spec(tmp_path / "spec.yaml")
    fp = plan.node(node).fingerprint
    return tmp_path / ".specdsl" / "nodes" / fp[:2] / fp


def run_twice_statuses(tmp_path: Path) -> tuple[str, str]:
    """The `doubled` node's status in the run after the damage, and in the run after that."""
    statuses = []
    for _ in range(2):
        result = api.run_plan(api.compile_spec(tmp_path / "spec.yaml"), progress=False)
        assert result.ok
        assert [r["q2"] for r in result.rows("doubled")] == ["xx", "yy"]
        manifest = json.loads((tmp_path / ".specdsl" / "run.json").read_text())
        statuses.append({n["id"]: n["status"] for n in manifest["nodes"]}["doubled"])
    return statuses[0], statuses[1]


# -- the store (item 9) ---------------------------------------------------------------------------------

def _damage_truncate_data(d: Path) -> None:
    data = d / "data.parquet"
    data.write_bytes(data.read_bytes()[:40])


def _damage_garbage_meta(d: Path) -> None:
    (d / "meta.json").write_text("{not json at all")


def _damage_delete_meta(d: Path) -> None:
    (d / "meta.json").unlink()


def _damage_meta_is_a_list(d: Path) -> None:
    (d / "meta.json").write_text("[1, 2, 3]")


@pytest.mark.parametrize("damage", [_damage_truncate_data, _damage_garbage_meta, _damage_delete_meta,
                                    _damage_meta_is_a_list], ids=lambda f: f.__name__[8:])
def test_a_damaged_stored_node_is_recomputed_once_then_cached(tmp_path, damage):
    spec = transform_spec(tmp_path)
    assert api.run_plan(api.compile_spec(spec), progress=False).ok
    damage(node_dir(tmp_path, "doubled"))
    first, second = run_twice_statuses(tmp_path)
    assert (first, second) == ("ran", "cached")  # recomputed, then trusted: never re-run forever
    assert any((tmp_path / ".specdsl" / "quarantine").iterdir())  # the broken copy is kept for a post-mortem


def test_a_file_where_the_store_should_be_is_a_clear_error(tmp_path):
    spec = transform_spec(tmp_path)
    (tmp_path / ".specdsl").write_text("in the way")
    for command in ("run", "plan"):
        out = cli(command, "--no-progress" if command == "run" else "--json", str(spec))
        assert "Traceback" not in out.stderr, out.stderr
        if command == "run":
            assert out.returncode == 1
            assert "is not a folder" in out.stderr and "--store" in out.stderr, out.stderr


def test_a_garbage_journal_is_a_clear_error_naming_the_file(tmp_path):
    from specdsl.execute.journal import RequestJournal

    path = tmp_path / "journal.sqlite"
    path.write_bytes(b"this is not an sqlite database, just garbage " * 200)
    with pytest.raises(RunError) as err:
        RequestJournal(path)
    assert str(path) in str(err.value) and err.value.hint
    assert path.read_bytes().startswith(b"this is not")  # never overwritten: it may hold paid answers


def test_a_run_over_a_garbage_journal_stops_with_that_message(tmp_path):
    from tests.fakeserver import FakeServer

    (tmp_path / "rows.jsonl").write_text('{"id":"a","q":"x"}\n')
    with FakeServer() as srv:
        spec = tmp_path / "spec.yaml"
        spec.write_text(f"""\
specdsl: 1
name: journal
models:
  m: {{backend: litellm, model: hosted_vllm/m, api_base: "http://127.0.0.1:{srv.port}/v1", max_retries: 0}}
sources:
  rows: {{path: rows.jsonl}}
steps:
  - id: answers
    generate: {{from: rows, model: m, user: "{{{{ row.q }}}}"}}
""")
        (tmp_path / ".specdsl").mkdir()
        (tmp_path / ".specdsl" / "journal.sqlite").write_bytes(b"garbage " * 1000)
        out = cli("run", "--no-progress", str(spec))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "journal.sqlite cannot be read" in out.stderr and "move it aside" in out.stderr, out.stderr


# -- sources (item 9) -----------------------------------------------------------------------------------

SOURCE_SPEC = """\
specdsl: 1
name: sources
sources:
  rows: {{path: "{path}", format: {fmt}{extra}}}
steps:
  - id: out
    map: {{from: rows, columns: {{x: "{{{{ row.{column} }}}}"}}}}
"""


def source_spec(tmp_path: Path, path: str, fmt: str, *, column: str = "id", extra: str = "") -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SOURCE_SPEC.format(path=path, fmt=fmt, column=column, extra=extra))
    return spec


def validate_errors(spec: Path) -> list:
    from specdsl.errors import SpecErrors

    try:
        api.compile_spec(spec)
    except SpecErrors as errs:
        return list(errs.errors)
    return []


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json", "parquet"])
def test_a_folder_given_to_a_file_format_is_s405_at_its_path(tmp_path, fmt):
    (tmp_path / "data").mkdir()
    errors = validate_errors(source_spec(tmp_path, "data", fmt))
    assert [e.code for e in errors] == ["S405"] and "is a folder" in errors[0].message
    assert errors[0].pos is not None and errors[0].pos.line == 4


def test_a_folder_given_to_a_file_format_is_a_run_error_naming_it(tmp_path):
    from specdsl.sources.formats import JSONL

    (tmp_path / "data").mkdir()
    with pytest.raises(RunError, match="'data' is a folder"):
        list(JSONL.iter_batches(tmp_path / "data", display="data"))


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_a_device_is_refused_at_validate_without_reading_it(tmp_path, fmt):
    errors = validate_errors(source_spec(tmp_path, "/dev/zero", fmt))  # a hang before the fix
    assert [e.code for e in errors] == ["S405"] and "not a regular file" in errors[0].message
    from specdsl.sources import files

    assert files.source_identity(Path("/dev/zero")) == {"not_a_file": "zero"}
    assert files.count_rows(Path("/dev/zero"), fmt) is None


SECRET_LINE = "root:x:0:0:SECRET-CONTENT:/root:/bin/bash"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_file_outside_the_spec_folder_is_never_quoted(tmp_path, how):
    outside = tmp_path / "elsewhere" / "passwd"
    outside.parent.mkdir()
    outside.write_text(SECRET_LINE + "\nbin:x:1:1::/:/sbin/nologin\n")
    home = tmp_path / "project"
    home.mkdir()
    path = {"dotdot": "../elsewhere/passwd", "absolute": str(outside), "symlink": "link.csv"}[how]
    if how == "symlink":
        (home / "link.csv").symlink_to(outside)
    spec = source_spec(home, path, "csv", column="nope", extra=", id: nope")
    for fmt in ("csv", "jsonl"):
        spec.write_text(spec.read_text().replace("format: csv", f"format: {fmt}").replace("format: jsonl", f"format: {fmt}"))
        errors = validate_errors(spec)
        assert errors, fmt
        shown = "\n".join(e.render() if hasattr(e, "render") else str(e) for e in errors)
        shown += "\n".join(str(e.hint) for e in errors)
        assert "SECRET-CONTENT" not in shown and "/bin/bash" not in shown, shown
        # The reason is shown whole: redaction hides secret values, not a file that happens to be named
        # like a secret-holding key ("passwd").
        assert "***" not in shown, shown
        assert ("outside the spec's folder" if fmt == "csv" else ":1: not valid JSON") in shown, shown


@pytest.mark.parametrize("text", ["cannot read '/etc/passwd': a reason", "cannot read '../x/password': why",
                                  r"cannot read 'C:\keys\api_key': why", "at /srv/secret: gone"])
def test_a_path_named_like_a_secret_key_is_not_redacted(text):
    from specdsl.errors import redact_secrets

    assert redact_secrets(text) == text
    assert redact_secrets("password: hunter22, passwd: 'x1'") == "password: ***, passwd: ***"


def test_plain_columns_of_a_data_file_outside_the_folder_still_check(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.csv").write_text("id,question\n1,why\n")
    (tmp_path / "spec").mkdir()
    errors = validate_errors(source_spec(tmp_path / "spec", "../data/rows.csv", "csv", column="questio"))
    assert [e.code for e in errors] == ["S302"] and "question" in (errors[0].hint or "")


def test_invalid_utf8_after_the_first_8kb_names_the_line(tmp_path):
    lines = [json.dumps({"id": str(i), "q": "x" * 100}) for i in range(200)]
    data = ("\n".join(lines) + "\n").encode() + b'{"id": "bad", "q": "\xff\xfe"}\n'
    (tmp_path / "rows.jsonl").write_bytes(data)
    (tmp_path / "rows.csv").write_bytes(b"id,q\n" + b"".join(f"{i},{'x' * 100}\n".encode() for i in range(200))
                                        + b"bad,\xff\n")
    for name, line in (("rows.jsonl", 201), ("rows.csv", 202)):
        from specdsl.sources import files

        with pytest.raises(RunError, match=rf"{name}:{line}: not valid UTF-8"):
            files.read_rows(tmp_path / name, name.split(".")[1], display=name)


def test_json_nested_100000_deep_names_the_line(tmp_path):
    from specdsl.sources import files

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "rows.jsonl").write_text('{"id": "a"}\n{"id": "b", "q": ' + deep + "}\n")
    with pytest.raises(RunError, match=r"rows.jsonl:2: JSON nested too deeply"):
        files.read_rows(tmp_path / "rows.jsonl", "jsonl", display="rows.jsonl")
    (tmp_path / "rows.json").write_text('[{"id": "a"},\n {"id": "b", "q": ' + deep + "}]\n")
    with pytest.raises(RunError, match=r"rows.json:2: malformed JSON \(nested too deeply"):
        files.read_rows(tmp_path / "rows.json", "json", display="rows.json")
    (tmp_path / "first.jsonl").write_text('{"q": ' + deep + "}\n")
    errors = validate_errors(source_spec(tmp_path, "first.jsonl", "jsonl"))
    assert [e.code for e in errors] == ["S405"] and "first.jsonl:1" in errors[0].message


def test_an_integer_of_5000_digits_names_the_line(tmp_path):
    from specdsl.sources import files

    big = "9" * 5000
    (tmp_path / "rows.jsonl").write_text('{"id": "a"}\n{"id": "b", "n": ' + big + "}\n")
    with pytest.raises(RunError, match=r"rows.jsonl:2: a value cannot be read \(Exceeds the limit"):
        files.read_rows(tmp_path / "rows.jsonl", "jsonl", display="rows.jsonl")
    (tmp_path / "rows.json").write_text('[{"id": "a"},\n {"id": "b", "n": ' + big + "}]\n")
    with pytest.raises(RunError, match=r"rows.json:2: malformed JSON \(a value cannot be read"):
        files.read_rows(tmp_path / "rows.json", "json", display="rows.json")


def test_a_truncated_parquet_file_is_a_clear_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from specdsl.sources import files

    pq.write_table(pa.table({"id": [str(i) for i in range(1000)], "q": ["x" * 50] * 1000}), tmp_path / "r.parquet")
    data = (tmp_path / "r.parquet").read_bytes()
    (tmp_path / "r.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="r.parquet: not a readable Parquet file"):
        files.read_rows(tmp_path / "r.parquet", "parquet", display="r.parquet")
    errors = validate_errors(source_spec(tmp_path, "r.parquet", "parquet"))
    assert [e.code for e in errors] == ["S405"] and "not a readable Parquet file" in errors[0].message


@pytest.mark.parametrize("body, message", [
    ("id,q\n1,a\n2,b,extra\n", r"rows.csv:3: the row has 3 fields, the header 2"),
    ("id,q\n1,a\n2\n", r"rows.csv:3: the row has 1 fields, the header 2"),
    ("id,q,q\n1,a,b\n", r"rows.csv:1: the header names column 'q' twice"),
])
def test_a_ragged_or_doubled_csv_is_refused_naming_the_row(tmp_path, body, message):
    from specdsl.sources import files

    (tmp_path / "rows.csv").write_text(body)
    with pytest.raises(RunError, match=message):
        files.read_rows(tmp_path / "rows.csv", "csv", display="rows.csv")


def test_a_doubled_csv_header_is_s405_at_validate(tmp_path):
    (tmp_path / "rows.csv").write_text("id,q,q\n1,a,b\n")
    errors = validate_errors(source_spec(tmp_path, "rows.csv", "csv"))
    assert [e.code for e in errors] == ["S405"] and "column 'q' twice" in errors[0].message


def test_a_null_id_is_refused_naming_the_row(tmp_path):
    from specdsl.sources import files

    (tmp_path / "rows.jsonl").write_text('{"id": "a"}\n{"id": null}\n')
    with pytest.raises(RunError, match=r"rows.jsonl: row 2 has no value in the id column 'id'"):
        files.read_rows(tmp_path / "rows.jsonl", "jsonl", display="rows.jsonl")
    (tmp_path / "keyed.jsonl").write_text('{"key": "a"}\n{"other": 1}\n')
    with pytest.raises(RunError, match=r"keyed.jsonl: row 2 has no value in the id column 'key'"):
        files.read_rows(tmp_path / "keyed.jsonl", "jsonl", id_column="key", display="keyed.jsonl")
    (tmp_path / "plain.jsonl").write_text('{"q": "a"}\n{"q": "b"}\n')  # no id column at all: row numbers
    assert [r["id"] for r in files.read_rows(tmp_path / "plain.jsonl", "jsonl")] == ["0", "1"]


# -- values validate must bound (item 9) ------------------------------------------------------------------

def shipped_spec_with(tmp_path: Path, old: str, new: str) -> Path:
    """specs/orca_erasure.yaml beside its data, with one line changed."""
    import shutil

    shutil.copytree(ROOT / "specs" / "data", tmp_path / "data")
    text = (ROOT / "specs" / "orca_erasure.yaml").read_text()
    assert old in text
    spec = tmp_path / "spec.yaml"
    spec.write_text(text.replace(old, new, 1))
    return spec


def line_of(spec: Path, needle: str) -> int:
    return next(i for i, line in enumerate(spec.read_text().splitlines(), 1) if needle in line)


@pytest.mark.parametrize("old, new, needle", [
    ("      batch_size: 8\n", "      batch_size: 1000000000000000000000000\n", "batch_size: 1000"),
    ("      max_length: 256\n", "      max_length: 256\n      gradient_accumulation: 100000000000000000000\n",
     "gradient_accumulation"),
])
def test_huge_integers_are_out_of_range_at_their_line(tmp_path, old, new, needle):
    spec = shipped_spec_with(tmp_path, old, new)
    errors = validate_errors(spec)
    assert [e.code for e in errors] == ["S103"], errors
    assert errors[0].pos.line == line_of(spec, needle)


def test_a_huge_source_limit_is_out_of_range(tmp_path):
    spec = transform_spec(tmp_path)
    spec.write_text(spec.read_text().replace("{path: rows.jsonl}", "{path: rows.jsonl, limit: 100000000000000000000}"))
    errors = validate_errors(spec)
    assert [e.code for e in errors] == ["S103"] and errors[0].pos.line == 4, errors


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN"])
def test_nan_and_infinity_are_refused_at_their_line(tmp_path, value):
    spec = transform_spec(tmp_path)
    spec.write_text(spec.read_text() + f"vars:\n  weight: {value}\n")
    errors = validate_errors(spec)
    assert [e.code for e in errors] == ["S103"] and "finite" in errors[0].message, errors
    assert errors[0].pos.line == line_of(spec, "weight:")
    (tmp_path / "m").mkdir()
    orca = shipped_spec_with(tmp_path / "m", "      learning_rate: 0.0005\n", f"      learning_rate: {value}\n")
    errors = validate_errors(orca)
    assert [e.code for e in errors] == ["S103"] and errors[0].pos.line == line_of(orca, "learning_rate:"), errors


def test_plan_json_never_prints_nan(tmp_path):
    spec = transform_spec(tmp_path)
    spec.write_text(spec.read_text() + "vars:\n  t: .nan\n")
    out = cli("plan", "--json", str(spec))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "NaN" not in out.stdout
    if out.stdout.strip():
        json.loads(out.stdout)


# -- templates and regexes: bounded, checked at validate (item 9) ------------------------------------------

def map_spec(tmp_path: Path, template: str) -> Path:
    spec = transform_spec(tmp_path)
    spec.write_text(spec.read_text().replace('"{{ row.q }}{{ row.q }}"', json.dumps(template)))
    return spec


def test_a_huge_constant_power_is_refused_at_validate(tmp_path):
    errors = validate_errors(map_spec(tmp_path, "{{ 9 ** (9 ** 9) }}"))
    assert [e.code for e in errors] == ["S304"] and "too large" in errors[0].message, errors
    assert errors[0].pos.line == 7


def test_a_huge_power_from_vars_fails_the_row_at_once(tmp_path):
    from specdsl import templates

    with pytest.raises(ValueError, match="too large"):
        templates.render("{{ vars.a ** vars.b }}", {}, {"a": 9, "b": 9 ** 9})
    assert templates.render("{{ 2 ** 10 }} {{ 2.0 ** 0.5 }} {{ (-3) ** 3 }}", {}, {}) == \
        "1024 1.4142135623730951 -27"


@pytest.mark.parametrize("pattern, code", [("(a+)+$", "S304"), (r"(\\w+\\s?)*x", "S304"), ("[", "S301")])
def test_a_bad_or_catastrophic_regex_in_a_template_is_refused_at_validate(tmp_path, pattern, code):
    errors = validate_errors(map_spec(tmp_path, "{{ row.q | regex_search('" + pattern + "') }}"))
    assert [e.code for e in errors] == [code], errors
    assert errors[0].pos.line == 7


def test_a_catastrophic_regex_from_data_is_refused_not_run(tmp_path):
    import time

    from specdsl import templates
    from specdsl.designs.matchers import match_answer

    start = time.process_time()  # CPU time: the work done, not how busy the machine is
    with pytest.raises(ValueError, match="exponential"):
        templates.render("{{ row.q | regex_search(row.p) }}", {"q": "a" * 40 + "!", "p": "(a+)+$"}, {})
    with pytest.raises(ValueError, match="exponential"):
        match_answer("regex", "a" * 40 + "!", "(a*)*$")  # no pattern: the gold is the regex
    assert time.process_time() - start < 1
    assert match_answer("regex", "Answer: 42", "42", pattern=r"Answer:\s*(\d+)")


def test_a_catastrophic_regex_in_a_filter_rule_is_s105(tmp_path):
    spec = transform_spec(tmp_path)
    spec.write_text(spec.read_text() + "  - id: kept\n    filter: {from: doubled, match: {field: q2, gold: q, "
                    "rule: regex, pattern: '(x+)+y'}}\n")
    errors = validate_errors(spec)
    assert [e.code for e in errors] == ["S105"] and "exponential" in errors[0].message, errors
    assert errors[0].pos.line == 9


# -- smaller front-end positions (item 14) ----------------------------------------------------------------

def test_a_macro_defined_in_a_template_is_not_an_unknown_variable(tmp_path):
    spec = map_spec(tmp_path, "{% macro wrap(x) %}<{{ x }}>{% endmacro %}{{ wrap(row.q) }}")
    assert validate_errors(spec) == []
    result = api.run_plan(api.compile_spec(spec), progress=False)
    assert [r["q2"] for r in result.rows("doubled")] == ["<x>", "<y>"]


@pytest.mark.parametrize("text, line, col", [
    ('specdsl: 1\nname: "unclosed\nsources:\n  rows: {path: rows.jsonl}\nsteps:\n  - id: a\n'
     '    map: {from: rows, columns: {q2: "{{ row.q }}"}}\n', 2, 7),
    ("specdsl: 1\nname: t\nsources:\n  rows: {path: rows.jsonl}\nsteps:\n  - id: a\n"
     "    map: {from: rows, columns: {q2: 'it''s {{ row.q }}}\n  - id: b\n"
     '    map: {from: rows, columns: {q3: "{{ row.q }}"}}\n', 7, 37),
])
def test_an_unclosed_quote_is_reported_where_it_opens(tmp_path, text, line, col):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    errors = validate_errors(spec)
    assert [(e.code, e.pos.line, e.pos.col) for e in errors] == [("S001", line, col)], errors
    assert "not closed" in errors[0].message


def test_a_step_without_id_is_reported_at_that_step(tmp_path):
    spec = transform_spec(tmp_path)
    spec.write_text(spec.read_text() + '  - map: {from: rows, columns: {q3: "{{ row.q }}"}}\n')
    errors = validate_errors(spec)
    assert [(e.code, e.pos.line) for e in errors] == [("S101", 8)], errors


def test_two_nodes_with_one_fingerprint_are_computed_once_and_nothing_is_quarantined(tmp_path):
    # Identical steps (as each seed's tokenize helper of a matrixed train step is) share a fingerprint:
    # the second is the first's committed output, not a recomputation that moves the first aside.
    (tmp_path / "rows.jsonl").write_text('{"id":"a","q":"x"}\n{"id":"b","q":"y"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text("""\
specdsl: 1
name: same-twice
sources:
  rows: {path: rows.jsonl}
steps:
  - {id: one, map: {from: rows, columns: {u: "{{ row.q }}!"}}}
  - {id: two, map: {from: rows, columns: {u: "{{ row.q }}!"}}}
  - {id: out1, export: {from: one, path: out1}}
  - {id: out2, export: {from: two, path: out2}}
""")
    plan = api.compile_spec(spec)
    assert plan.node("one").fingerprint == plan.node("two").fingerprint
    result = api.run_plan(plan, store_dir=tmp_path / "store", progress=False)
    statuses = {n.id: n.status for n in result.nodes}
    assert (statuses["one"], statuses["two"]) == ("ran", "cached")
    expected = [{"id": "a", "q": "x", "u": "x!"}, {"id": "b", "q": "y", "u": "y!"}]
    assert result.rows("two") == result.rows("one") == expected
    assert not (tmp_path / "store" / "quarantine").exists() or not any((tmp_path / "store" / "quarantine").iterdir())
    assert (tmp_path / "out2" / "data.jsonl").read_text() == (tmp_path / "out1" / "data.jsonl").read_text()
