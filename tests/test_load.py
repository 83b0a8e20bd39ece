"""Positioned, safe YAML loading (specdsl.frontend.load): values, positions, and hostile input."""

from __future__ import annotations

import time

import pytest

from specdsl.errors import SourcePos, SpecErrors
from specdsl.frontend.load import MAX_FILE_BYTES, load_yaml_file, load_yaml_text, read_text


def load(text: str):
    return load_yaml_text(text, "f.yaml")


def errors(text: str) -> SpecErrors:
    with pytest.raises(SpecErrors) as info:
        load(text)
    return info.value


def test_every_key_and_value_has_its_position():
    doc = load("specdsl: 1\nname: x\nsteps:\n  - id: a\n    map: {from: b, columns: {c: '{{ row.d }}'}}\n")
    assert doc.key_pos[("steps", 0, "map")] == SourcePos("f.yaml", 5, 5)
    assert doc.value_pos[("steps", 0, "map", "from")] == SourcePos("f.yaml", 5, 17)
    assert doc.key_pos[("steps", 0, "map", "columns", "c")] == SourcePos("f.yaml", 5, 30)
    assert doc.value_pos[("steps", 0, "map", "columns", "c")] == SourcePos("f.yaml", 5, 33)
    # A path that does not exist falls back to its nearest ancestor.
    assert doc.pos(("steps", 0, "map", "into")) == SourcePos("f.yaml", 5, 10)
    assert doc.pos(("steps", 0, "map", "into"), key=True) == SourcePos("f.yaml", 5, 5)


def test_crlf_line_endings_and_bom(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"\xef\xbb\xbfspecdsl: 1\r\nname: x\r\nsteps: []\r\n")
    doc = load_yaml_file(path, "s.yaml")
    assert doc.data == {"specdsl": 1, "name": "x", "steps": []}
    assert doc.value_pos[("name",)] == SourcePos("s.yaml", 2, 7)
    assert doc.lines[1] == "name: x"


def test_values_are_plain_python_values():
    doc = load("a: 2024-05-01\nb: 5e-4\nc: '5e-4'\nd: 1.5\ne: true\nf: ~\ng: 0x10\nh: [1, two]\n")
    assert doc.data == {"a": "2024-05-01", "b": 0.0005, "c": "5e-4", "d": 1.5, "e": True, "f": None, "g": 16,
                        "h": [1, "two"]}


def test_plain_keys_keep_their_text():
    # YAML 1.1 reads `on`, `no`, `null` and `1` as booleans/None/ints; as keys they are names.
    assert load("on: a\nno: b\nnull: c\n1: d\n").data == {"on": "a", "no": "b", "null": "c", "1": "d"}


def test_merge_keys_and_anchors():
    doc = load("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\nlist: &l [1, 2]\nsame: *l\n")
    assert doc.data["other"] == {"x": 1, "y": 3}
    assert doc.data["same"] == [1, 2]


def test_merge_of_a_non_mapping_is_an_error():
    exc = errors("other:\n  <<: 5\n")
    assert [(e.code, e.pos.line, e.pos.col) for e in exc.errors] == [("S102", 2, 7)]
    assert "merges mappings, not a number" in exc.errors[0].message


def test_complex_keys_are_rejected():
    exc = errors("? [a, b]\n: x\n")
    assert [(e.code, e.pos.line, e.pos.col) for e in exc.errors] == [("S102", 1, 3)]


def test_all_duplicate_keys_are_reported_together():
    exc = errors("a: 1\nb: {x: 1, x: 2}\na: 3\n")
    assert [(e.code, e.pos.line, e.pos.col) for e in exc.errors] == [("S002", 2, 11), ("S002", 3, 1)]


def test_every_unsafe_tag_is_reported():
    exc = errors("a: !!python/name:os.system\nb: !!binary aGk=\nc: !!set {x}\nd: [!!python/tuple [1]]\n")
    assert [e.code for e in exc.errors] == ["S003"] * 4
    assert [e.pos.line for e in exc.errors] == [1, 2, 3, 4]


def test_control_characters_are_positioned_and_not_printed():
    exc = errors("name: a\x1b[2Jb\n")
    (err,) = exc.errors
    assert (err.code, err.pos.line, err.pos.col) == ("S001", 1, 8)
    assert "\x1b" not in exc.render()  # a hostile file cannot send escape sequences to the terminal


def test_tabs_used_for_indentation():
    exc = errors("steps:\n\t- id: a\n")
    assert [(e.code, e.pos.line, e.pos.col) for e in exc.errors] == [("S001", 2, 1)]


def test_document_markers_only_is_empty():
    exc = errors("---\n...\n")
    assert exc.codes == ["S005"]


def test_directives_are_fine():
    assert load("%YAML 1.1\n---\nspecdsl: 1\n").data == {"specdsl": 1}


def test_deep_but_legal_nesting_loads():
    text = "a: " + "[" * 60 + "1" + "]" * 60 + "\n"
    assert load(text).data["a"] is not None


def test_many_aliases_within_budget_load():
    text = "a: &a {x: 1}\n" + "".join(f"k{i}: *a\n" for i in range(500))
    assert len(load(text).data) == 501


def test_read_text_stops_at_the_size_limit(tmp_path):
    path = tmp_path / "big.yaml"
    with path.open("wb") as fh:
        fh.write(b"a: 1\n")
        fh.seek(MAX_FILE_BYTES * 50)
        fh.write(b"\n")  # a sparse 100 MB file: refusing it must not read it
    start = time.process_time()  # CPU time: the work done, not how busy the machine is
    with pytest.raises(SpecErrors) as info:
        read_text(path, "big.yaml")
    assert time.process_time() - start < 0.5
    assert info.value.codes == ["S006"] and "104,857,6" in info.value.errors[0].message


def test_unreadable_path_is_S006(tmp_path):
    with pytest.raises(SpecErrors) as info:
        read_text(tmp_path, "folder")
    assert info.value.codes == ["S006"] and "cannot read spec file" in info.value.errors[0].message
