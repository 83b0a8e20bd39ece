"""Sources: peeking at a data file's columns at validate time, reading and counting rows without holding the
whole file."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest

from specdsl import api
from specdsl.errors import RunError
from specdsl.sources import files as source
from specdsl.sources.files import (JsonSyntaxError, NotAListOfObjects, first_json_record_columns, iter_json_records,
                                  peek_columns)


class CountingReader:
    """A text file that counts the characters handed out, to show how far a reader went."""

    def __init__(self, text: str):
        self._inner = io.StringIO(text)
        self.chars_read = 0

    def read(self, size: int = -1) -> str:
        piece = self._inner.read(size)
        self.chars_read += len(piece)
        return piece


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# The columns reported are those of the first record, exactly as a full json.loads would give them.
VALID_DOCUMENTS = [
    '[{"id": 1, "question": "q", "answer": "a"}, {"id": 2, "extra": true}]',
    '  \n[\n  {"b": 1, "a": 2}\n]\n',
    '[{"dup": 1, "x": 2, "dup": 3}]',
    '[{"text": "brackets ] and } and \\" inside", "n": -1.5e3, "z": null, "f": false, "i": Infinity}]',
    '[{"caf\\u00e9": "\\ud83d\\ude00", "ünï": "ok"}]',
    '[{"nested": {"deep": [1, {"k": [2, 3]}]}, "after": 1}, 7]',  # only the first record is checked
    '[{}]',
    '[]',
    ' [ ] ',
]


@pytest.mark.parametrize("document", VALID_DOCUMENTS)
@pytest.mark.parametrize("first_read", [1, 3, 7, 1 << 16])
def test_json_peek_reports_the_first_records_keys_whatever_the_read_sizes(document, first_read, monkeypatch):
    monkeypatch.setattr(source, "_READ_CHARS", first_read)  # records cut at every possible place
    data = json.loads(document)
    expected = tuple(data[0]) if data else ()
    assert first_json_record_columns(io.StringIO(document), "d.json") == expected


def test_json_peek_through_peek_columns(tmp_path):
    path = write(tmp_path, "rows.json", json.dumps([{"id": "a", "question": "q?"}, {"id": "b", "other": 1}]))
    assert peek_columns(path, "json") == ("id", "question")


@pytest.mark.parametrize("document, message", [
    ('{"id": 1}', "d.json: a JSON source must be a list of objects"),
    ('"text"', "d.json: a JSON source must be a list of objects"),
    ('[1, 2]', "d.json: a JSON source must be a list of objects"),
    ('[[{"id": 1}]]', "d.json: a JSON source must be a list of objects"),
    ('', "d.json:1:1: not valid JSON (Expecting value)"),
    ('  \n ', "d.json:2:2: not valid JSON (Expecting value)"),
    ('oops', "d.json:1:1: not valid JSON (Expecting value)"),
    ('[', "d.json:1:2: not valid JSON (Expecting value)"),
    ('[\n  {"id": 1,, "q": 2}]', "d.json:2:12: not valid JSON (Expecting property name enclosed in double quotes)"),
    ('[\n{"id": 1}\n{"id": 2}]', "d.json:3:1: not valid JSON (Expecting ',' delimiter)"),
    ('[{"id": "never closed', "d.json:1:9: not valid JSON (Unterminated string starting at)"),
    ('[{"id": 1}', "d.json:1:11: not valid JSON (Expecting ',' delimiter)"),
    ('\ufeff[{"id": 1}]', "d.json:1:1: not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))"),
])
def test_json_peek_errors_name_the_file_line_and_column(document, message):
    with pytest.raises(ValueError) as info:
        first_json_record_columns(io.StringIO(document), "d.json")
    assert str(info.value) == message


def test_a_malformed_first_record_is_reported_without_reading_the_rest(monkeypatch):
    monkeypatch.setattr(source, "_READ_CHARS", 64)
    document = '[{"id": 1,, "q": 2}, ' + ", ".join('{"id": %d}' % i for i in range(100_000)) + "]"
    reader = CountingReader(document)
    with pytest.raises(ValueError, match=r"d.json:1:11: not valid JSON"):
        first_json_record_columns(reader, "d.json")
    assert reader.chars_read == 64


def test_a_first_record_larger_than_the_first_read_is_read_whole():
    big = "x" * 3_000_000  # far beyond the first read: the buffer grows until the record parses
    document = json.dumps([{"id": 1, "text": big, "last": True}, {"id": 2}])
    reader = CountingReader(document)
    assert first_json_record_columns(reader, "d.json") == ("id", "text", "last")
    assert reader.chars_read < 2 * len(document)


@pytest.fixture(scope="module")
def big_json_source(tmp_path_factory) -> Path:
    """A ~50 MB JSON array whose tail is not JSON: only a reader that stops early can take its columns."""
    path = tmp_path_factory.mktemp("big") / "big.json"
    record = {"id": 0, "question": "What is 2 + 2? " * 8, "answer": "4"}
    chunk = ",\n".join(json.dumps({**record, "id": i}) for i in range(10_000))
    with path.open("w", encoding="utf-8") as fh:
        fh.write("[\n")
        while fh.tell() < 50_000_000:
            fh.write(chunk + ",\n")
        fh.write('{"id": "truncated here, no closing quote or bracket')
    return path


def test_peeking_a_50_mb_json_source_reads_a_bounded_prefix(big_json_source):
    assert big_json_source.stat().st_size > 50_000_000
    # A full parse would fail at the tail; a peek never gets there.
    assert peek_columns(big_json_source, "json") == ("id", "question", "answer")
    with big_json_source.open(encoding="utf-8") as fh:
        reader = CountingReader(fh.read(1 << 20))  # the first MiB is all a peek may look at
    assert first_json_record_columns(reader, "big.json") == ("id", "question", "answer")
    assert reader.chars_read <= source._READ_CHARS


def test_validate_takes_a_big_json_sources_columns_from_its_head(big_json_source, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""\
specdsl: 1
name: big
models:
  teacher: {{backend: transformers, model: smollm2-135m-instruct}}
sources:
  problems: {{path: {big_json_source}, format: json}}
steps:
  - id: answers
    generate: {{from: problems, model: teacher, user: "{{{{ row.question }}}}", into: response}}
""")
    plan = api.compile_spec(spec, identities=False)
    assert plan.node("problems").columns == ("id", "question", "answer")


# --------------------------------------------------------------------------------------------------
# Reading rows: JSON arrays record by record, with a full json.loads's results and faults
# --------------------------------------------------------------------------------------------------


def full_parse(document: str) -> tuple:
    """What a whole-file json.loads makes of a JSON source: its records, or its first fault."""
    try:
        data = json.loads(document)
    except json.JSONDecodeError as exc:
        return ("malformed", exc.msg, exc.lineno, exc.colno)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        return ("not a list of objects",)
    return ("rows", data)


def streamed_parse(document: str) -> tuple:
    try:
        return ("rows", list(iter_json_records(io.StringIO(document))))
    except JsonSyntaxError as exc:
        return ("malformed", exc.msg, exc.lineno, exc.colno)
    except NotAListOfObjects:
        return ("not a list of objects",)


DOCUMENTS = VALID_DOCUMENTS + [
    '[\n  {"id": 1, "q": "a\\nb"},\n  {"id": 2, "f": 1.5e3, "n": -1E7, "u": "\\ud83d\\ude00"}\r\n, {"id": 3}\n]\n',
    '[{"a": 1}]  \n\t ', '[{"a": 1}] x', '[{"a": 1}]\n\n  ]',  # trailing whitespace, extra data
    '[{"a": 1},]', '[{"a": 1},\n\n   ]', '[{"a": 1}, ,{}]', '[,{}]',  # commas without records
    '[{"a": 1}', '[{"a": 1},', '[{"a": 1}\n{"b": 2}]', '[{"a": 1}, {"b": 2', '[{"a": tru}]',
    '[{"a": 1}, 2]', '[{"a": 1}, 2 x', '[2, {"a": 1}, {"b": }]',  # a fault anywhere outranks a non-object
    '{"id": 1}', '"text"', '12', '{"id": 1', 'nope',  # a top level that is not a list, valid or not
    '', ' \n ', '\ufeff[{"a": 1}]', '[', '[\n', '[\n\n{"a": 1,, "b": 2}]',
]


@pytest.mark.parametrize("document", DOCUMENTS)
@pytest.mark.parametrize("read_chars", [1, 2, 3, 7, 1 << 16])
def test_streamed_json_records_and_faults_are_those_of_a_full_parse(document, read_chars, monkeypatch):
    monkeypatch.setattr(source, "_READ_CHARS", read_chars)  # records and whitespace cut at every place
    assert streamed_parse(document) == full_parse(document)


def test_streamed_json_agrees_with_a_full_parse_on_damaged_documents(monkeypatch):
    """Deterministic damage (deleted, inserted and cut characters) to valid sources, read in small
    pieces: every verdict, message, line and column matches json.loads."""
    import random

    rng = random.Random(7)
    originals = [d for d in DOCUMENTS if full_parse(d)[0] == "rows" and len(d) > 4]
    alphabet = ' \n\t[]{},:"\\0123456789-.eEtrufalsnNI\ufeffx\u00e9'
    for read_chars in (1, 3, 64):
        monkeypatch.setattr(source, "_READ_CHARS", read_chars)
        for _ in range(700):
            document = rng.choice(originals)
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(document) + 1)
                damage = rng.random()
                if damage < 0.4:
                    document = document[:i] + document[i + 1:]
                elif damage < 0.85:
                    document = document[:i] + rng.choice(alphabet) + document[i:]
                else:
                    document = document[:i]
            assert streamed_parse(document) == full_parse(document), document


def test_read_rows_keeps_its_messages_for_malformed_and_misshapen_json(tmp_path):
    cases = {
        '[\n  {"id": 1},\n  {"id": 2,, "q": 1}\n]': "d.json:3: malformed JSON (Expecting property name enclosed in "
                                                     "double quotes)",
        '[{"id": 1}]\n]': "d.json:2: malformed JSON (Extra data)",
        '{"id": 1}': "d.json: a JSON source must be a list of objects",
        '[{"id": 1},\n 7]': "d.json:2: a JSON source must be a list of objects",
    }
    for document, message in cases.items():
        path = write(tmp_path, "d.json", document)
        with pytest.raises(RunError) as info:
            source.read_rows(path, "json", display="d.json")
        assert info.value.message == message


def test_a_limited_json_read_stops_after_its_records(big_json_source):
    # The tail is not JSON: a full read fails there (on the file's last line), a limited one never gets there.
    rows = source.read_rows(big_json_source, "json", limit=5)
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"]
    with big_json_source.open(encoding="utf-8") as fh:
        reader = CountingReader(fh.read(1 << 20))
    assert len(list(itertools.islice(iter_json_records(reader), 5))) == 5
    assert reader.chars_read <= source._READ_CHARS
    last_line = big_json_source.read_bytes().count(b"\n") + 1
    with pytest.raises(RunError, match=rf"big.json:{last_line}: malformed JSON \(Unterminated string"):
        source.read_rows(big_json_source, "json", display="big.json")


def test_counting_a_json_source_holds_a_window_not_the_file(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(source, "_READ_CHARS", 4096)  # a small window, so a small file shows the difference
    path = tmp_path / "valid.json"
    path.write_text(json.dumps([{"id": i, "text": f"record {i} " * 15} for i in range(8000)], indent=1),
                    encoding="utf-8")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        assert source.count_rows(path, "json") == 8000
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 10  # a full parse holds the text and every record: several times the file


def test_counting_a_json_source_reports_a_fault_like_the_read(big_json_source):
    with pytest.raises(JsonSyntaxError, match="Unterminated string"):
        source.count_rows(big_json_source, "json")


def test_csv_counts_and_limited_reads_match_the_full_read(tmp_path):
    path = write(tmp_path, "d.csv", "id,q\n1,a\n\n2,b\n3,\"multi\nline\"\n\n")
    rows = source.read_rows(path, "csv")
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    assert source.count_rows(path, "csv") == len(rows)  # blank lines are no rows, in either
    assert source.read_rows(path, "csv", limit=2) == rows[:2]


def test_parquet_limited_reads_decode_only_the_first_batches(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(1000)], "x": list(range(1000))}), path,
                   row_group_size=64)
    rows = source.read_rows(path, "parquet")
    assert source.count_rows(path, "parquet") == 1000
    monkeypatch.setattr(pq, "read_table", None)  # a limited read must not read the whole table
    assert source.read_rows(path, "parquet", limit=150) == rows[:150]  # across row groups
    assert source.read_rows(path, "parquet", limit=3) == rows[:3]
