"""Reading sources: the first node of every plan. Columns are peeked at compile time; rows read at run time."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import RunError

Rows = list[dict[str, Any]]


def peek_columns(path: Path, fmt: str) -> tuple[str, ...]:
    """The columns of a data file, read from its first record (or header) only."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        first = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path.name}:{lineno}: not valid JSON ({exc.msg})") from None
                    if not isinstance(first, dict):
                        raise ValueError(f"{path.name}:{lineno}: each line must be a JSON object")
                    return tuple(first)
        return ()
    if fmt == "csv":
        with path.open(encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh), [])
        return tuple(header)
    if fmt == "json":
        with path.open(encoding="utf-8") as fh:
            return first_json_record_columns(fh, path.name)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return tuple(pq.read_schema(path).names)
    raise ValueError(f"unknown format {fmt!r}")


# Reading a JSON array in growing pieces. The first piece is small because most records are; each retry
# doubles it, so a huge first record is still parsed in linear time overall.
_FIRST_READ_CHARS = 1 << 16
# A parse error this close to the end of what was read may just be a value cut off by the read (a
# literal such as "Infinity", a \uXXXX surrogate pair): read on before calling the file malformed.
_CUT_OFF_MARGIN = 16
_JSON_VALUE_STARTS = frozenset('{"-0123456789tfnNI')


def first_json_record_columns(fh: Any, name: str) -> tuple[str, ...]:
    """The keys of the first object of the JSON array in text file ``fh``, reading little beyond that object.

    Validation peeks at sources whose full parse would cost as much as the data (a multi-GB JSON array),
    so only the opening bracket, the first record and the delimiter after it are read and checked; the
    rest of the file is checked when the rows are read at run time. ``name`` prefixes errors, which
    carry the line and column of the fault.
    """
    decoder = json.JSONDecoder()
    text, at_end, want = "", False, _FIRST_READ_CHARS

    def read_more() -> None:
        nonlocal text, at_end, want
        piece = fh.read(want)
        text += piece
        at_end = piece == ""
        want *= 2

    def malformed(message: str, pos: int) -> ValueError:
        exc = json.JSONDecodeError(message, text, pos)
        return ValueError(f"{name}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})")

    def next_significant(pos: int) -> int:
        """Index of the first non-whitespace character at or after ``pos`` (len(text) at the end)."""
        while True:
            while pos < len(text) and text[pos] in " \t\n\r":
                pos += 1
            if pos < len(text) or at_end:
                return pos
            read_more()

    read_more()
    if text.startswith("\ufeff"):
        raise malformed("Unexpected UTF-8 BOM (decode using utf-8-sig)", 0)
    pos = next_significant(0)
    if pos == len(text):
        raise malformed("Expecting value", pos)
    if text[pos] != "[":
        if text[pos] in _JSON_VALUE_STARTS:
            raise ValueError(f"{name}: a JSON source must be a list of objects")
        raise malformed("Expecting value", pos)
    pos = next_significant(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return ()
    while True:
        try:
            first, end = decoder.raw_decode(text, pos)
            break
        except json.JSONDecodeError as exc:
            cut_off = exc.msg.startswith("Unterminated string") or exc.pos >= len(text) - _CUT_OFF_MARGIN
            if at_end or not cut_off:
                raise malformed(exc.msg, exc.pos) from None
            read_more()
    if not isinstance(first, dict):
        raise ValueError(f"{name}: a JSON source must be a list of objects")
    # The delimiter after the record is cheap to check and catches a missing comma at the top.
    end = next_significant(end)
    if end == len(text) or text[end] not in ",]":
        raise malformed("Expecting ',' delimiter", end)
    return tuple(first)


def source_identity(path: Path) -> dict[str, Any]:
    """Content hash of a source file: its node's fingerprint changes exactly when the data does."""
    path = Path(path)
    if not path.exists():
        return {"missing": str(path.name)}
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def count_rows(path: Path, fmt: str) -> int | None:
    """Cheap row count for estimates (None when it would mean reading a big file)."""
    path = Path(path)
    if not path.exists():
        return None
    if fmt == "jsonl":
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
    if fmt == "csv":
        with path.open(encoding="utf-8", newline="") as fh:
            return max(sum(1 for _ in csv.reader(fh)) - 1, 0)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    if fmt == "json":
        return len(json.loads(path.read_text(encoding="utf-8")))
    return None


def read_rows(path: Path, fmt: str, *, id_column: str | None = None, limit: int | None = None,
              display: str | None = None) -> Rows:
    """Read a source into rows, each with a string ``id`` (the id column, or the row number)."""
    path = Path(path)
    display = display or str(path)
    if not path.exists():
        raise RunError(f"source file '{display}' does not exist", hint="check `path:` (relative to the spec file)")
    rows: Rows = []
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RunError(f"{display}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})",
                                   hint="fix or remove that line; each line holds one JSON object") from None
                if not isinstance(row, dict):
                    raise RunError(f"{display}:{lineno}: each line must be a JSON object, not {type(row).__name__}")
                rows.append(row)
                if limit and len(rows) >= limit:
                    break
    elif fmt == "csv":
        with path.open(encoding="utf-8", newline="") as fh:
            rows = [dict(r) for r in csv.DictReader(fh)]
    elif fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunError(f"{display}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise RunError(f"{display}: a JSON source must be a list of objects")
        rows = [dict(r) for r in data]
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    if limit:
        rows = rows[:limit]
    key = id_column or "id"
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        row["id"] = str(row[key]) if key in row and row[key] is not None else str(i)
        out.append(row)
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RunError(f"{display}: id '{dup}' appears more than once", hint="ids identify rows in caches and reports; make them unique")
    return out
