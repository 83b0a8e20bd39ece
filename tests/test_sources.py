"""Sources: peeking at a data file's columns at validate time without reading the whole file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from specdsl import api
from specdsl.steps import source
from specdsl.steps.source import first_json_record_columns, peek_columns


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
    monkeypatch.setattr(source, "_FIRST_READ_CHARS", first_read)  # records cut at every possible place
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
    monkeypatch.setattr(source, "_FIRST_READ_CHARS", 64)
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
    assert reader.chars_read <= source._FIRST_READ_CHARS


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
