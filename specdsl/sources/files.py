"""Reading sources: the first node of every plan. Columns are peeked at compile time; rows read at run time."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from specdsl.errors import RunError
from specdsl.sources.ids import IdAssigner

Rows = list[dict[str, Any]]


def peek_columns(path: Path, fmt: str) -> tuple[str, ...]:
    """The columns of a data file, read from its first record (or header) only."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    problem = not_a_data_file(path, fmt)
    if problem:
        raise ValueError(problem)
    try:
        return _peek_columns(path, fmt)
    except UnicodeDecodeError:
        raise ValueError(f"{path.name}:{utf8_fault_line(path)}: not valid UTF-8 text") from None


def _peek_columns(path: Path, fmt: str) -> tuple[str, ...]:
    if fmt == "jsonl":
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if raw.strip():
                    first = parse_json_line(raw, lineno, path.name, ValueError)
                    if not isinstance(first, dict):
                        raise ValueError(f"{path.name}:{lineno}: each line must be a JSON object")
                    return tuple(first)
        return ()
    if fmt == "csv":
        with path.open(encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh), [])
        repeated = _repeated(header)
        if repeated:
            raise ValueError(f"{path.name}:1: the header names column '{repeated}' twice")
        return tuple(header)
    if fmt == "json":
        with path.open(encoding="utf-8") as fh:
            return first_json_record_columns(fh, path.name)
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # a core install (the pre-commit hook's): say how to go on
            raise ValueError('reading a Parquet file\'s columns needs pyarrow: pip install "specdsl[run]", '
                             "or declare the source's `columns:`") from None
        try:
            return tuple(pq.read_schema(path).names)
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a truncated or foreign file vary
            raise ValueError(f"{path.name}: not a readable Parquet file ({type(exc).__name__})") from None
    raise ValueError(f"unknown format {fmt!r}")


def not_a_data_file(path: Path, fmt: str) -> str | None:
    """Why ``path`` (which exists) cannot be read as a ``fmt`` file, or None. Only regular files are read: a
    device such as /dev/zero or a pipe would never end (validate would hang)."""
    if path.is_dir():
        return f"'{path.name}' is a folder, not a {fmt} file"
    if not path.is_file():
        return f"'{path.name}' is not a regular file (a device, pipe or socket); a source reads a data file"
    return None


def utf8_fault_line(path: Path) -> int:
    """The 1-based line of the first byte sequence in ``path`` that is not UTF-8 (read in pieces)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as fh:
        for piece in iter(lambda: fh.read(1 << 16), b""):
            try:
                decoder.decode(piece)
            except UnicodeDecodeError as exc:
                return line + piece.count(b"\n", 0, exc.start)
            line += piece.count(b"\n")
    return line


def parse_json_line(raw: bytes, lineno: int, display: str, error: Callable[..., Exception]) -> Any:
    """One JSON line, every fault (invalid UTF-8, bad JSON, nesting too deep, a number too long for
    Python) raised as ``error`` naming ``display:lineno``."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{display}:{lineno}: not valid UTF-8 (byte {exc.start + 1} of the line)") from None
    except json.JSONDecodeError as exc:
        what = "malformed JSON line" if error is not ValueError else "not valid JSON"  # run / validate's peek
        raise error(f"{display}:{lineno}: {what} ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise error(f"{display}:{lineno}: JSON nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise error(f"{display}:{lineno}: a value cannot be read ({str(exc).split(';')[0]})") from None


def _repeated(names: list[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


# A JSON array is read in pieces of this many characters, holding one piece (plus the record that straddles
# its end) at a time. A record longer than a piece grows the window by as much again on each retry, so a
# huge record is still parsed in linear time overall.
_READ_CHARS = 1 << 16
# A parse error this close to the end of what was read may just be a value cut off by the read (a
# literal such as "Infinity", or an escaped surrogate pair), and a number ending this close may go on past
# it: read on before calling the file malformed or the value complete.
_CUT_OFF_MARGIN = 16
_JSON_VALUE_STARTS = frozenset('{"-0123456789tfnNI')
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")  # what json.decoder skips between tokens


class JsonSyntaxError(ValueError):
    """Malformed JSON, with the json module's message and the 1-based line and column of the fault."""

    def __init__(self, msg: str, lineno: int, colno: int):
        super().__init__(f"{msg}: line {lineno} column {colno}")
        self.msg, self.lineno, self.colno = msg, lineno, colno


class NotAListOfObjects(ValueError):
    """Valid JSON that is not a list of objects; ``lineno`` is the offending record's line (None when the
    top level is not a list)."""

    def __init__(self, lineno: int | None = None):
        super().__init__("a JSON source must be a list of objects")
        self.lineno = lineno


class _Window:
    """The part of a text file being parsed. Text before ``text`` has been dropped; its line count and the
    length of its last line are kept, so a position in ``text`` still maps to the file's line and column
    (as json.JSONDecodeError counts them over the whole file)."""

    def __init__(self, fh: Any):
        self._fh = fh
        self.text = ""
        self.offset = 0  # where ``text`` starts in the file
        self.at_end = False
        self._lines_dropped = 0
        self._chars_dropped_on_last_line = 0

    def read_more(self, keep_from: int) -> int:
        """Drop ``text[:keep_from]`` and append what follows in the file; returns ``keep_from``, the amount
        every position in ``text`` moved down by."""
        newlines = self.text.count("\n", 0, keep_from)
        if newlines:
            self._lines_dropped += newlines
            self._chars_dropped_on_last_line = keep_from - self.text.rfind("\n", 0, keep_from) - 1
        else:
            self._chars_dropped_on_last_line += keep_from
        self.offset += keep_from
        kept = self.text[keep_from:]
        piece = self._fh.read(max(_READ_CHARS, len(kept)))
        self.text = kept + piece
        self.at_end = piece == ""
        return keep_from

    def next_significant(self, pos: int, keep_from: int | None = None) -> int:
        """Index of the first non-whitespace character at or after ``pos`` (len(text) at the end of the
        file). Reading on drops the text before ``keep_from`` (default: the whitespace skipped so far)."""
        while True:
            pos = _JSON_WHITESPACE.match(self.text, pos).end()
            if pos < len(self.text) or self.at_end:
                return pos
            shift = self.read_more(pos if keep_from is None else keep_from)
            pos -= shift
            if keep_from is not None:
                keep_from -= shift

    def decode(self, raw_decode: Callable[[str, int], tuple[Any, int]], pos: int) -> tuple[Any, int, int]:
        """The JSON value starting at ``pos``, its end and its (possibly moved) start: reads on while the
        value may run past what has been read."""
        while True:
            try:
                value, end = raw_decode(self.text, pos)
            except json.JSONDecodeError as exc:
                cut_off = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.text) - _CUT_OFF_MARGIN
                if self.at_end or not cut_off:
                    raise self.syntax_error(exc.msg, exc.pos) from None
            except RecursionError:
                raise self.syntax_error("nested too deeply to read", pos) from None
            except ValueError as exc:  # an integer of more digits than Python converts: more text won't help
                raise self.syntax_error(f"a value cannot be read ({str(exc).split(';')[0]})", pos) from None
            else:
                # A number ending near the end of what was read may go on in the file: "1" of "1.5" or
                # "1e7" cut after the "1." or "1e" parses as 1.
                if self.at_end or end < len(self.text) - _CUT_OFF_MARGIN:
                    return value, end, pos
            pos -= self.read_more(pos)

    def read_rest(self) -> None:
        self.text += self._fh.read()
        self.at_end = True

    def line_col(self, pos: int) -> tuple[int, int]:
        newlines = self.text.count("\n", 0, pos)
        if newlines:
            return self._lines_dropped + newlines + 1, pos - self.text.rfind("\n", 0, pos)
        return self._lines_dropped + 1, self._chars_dropped_on_last_line + pos + 1

    def syntax_error(self, msg: str, pos: int) -> JsonSyntaxError:
        return JsonSyntaxError(msg, *self.line_col(pos))


def iter_json_records(fh: Any, *, fail_fast: bool = False) -> Iterator[dict[str, Any]]:
    """The objects of the JSON array in text file ``fh``, one at a time, holding about one read's worth
    of the file (and the record being parsed) at a time. A record is yielded once the delimiter after it
    (``,`` or ``]``) has been read.

    Faults are those a full ``json.loads`` of the file would find first, with its message, line and
    column (:class:`JsonSyntaxError`); only valid JSON of the wrong shape raises :class:`NotAListOfObjects`
    (with the line of the first record that is not an object), so a top level that is not an array is
    parsed whole and a wrong record is reported at the end of the file. What comes after the last record
    taken is never read: a reader that stops early sees no fault beyond it. ``fail_fast`` (validation's
    peek) reports a wrong shape at once instead, without parsing any further.
    """
    window = _Window(fh)
    window.read_more(0)
    if window.text.startswith("\ufeff"):
        raise window.syntax_error("Unexpected UTF-8 BOM (decode using utf-8-sig)", 0)
    pos = window.next_significant(0)
    if pos == len(window.text):
        raise window.syntax_error("Expecting value", pos)
    if window.text[pos] != "[":
        if window.text[pos] not in _JSON_VALUE_STARTS:
            raise window.syntax_error("Expecting value", pos)
        if not fail_fast:
            window.read_rest()
            try:
                json.loads(window.text)
            except json.JSONDecodeError as exc:
                raise window.syntax_error(exc.msg, exc.pos) from None
        raise NotAListOfObjects()
    first_wrong_record: int | None = None  # its line
    # The states and messages below are those of the json module's array parser. Each step first tries
    # the text read so far (records and delimiters well inside it are the common case); the window's own
    # methods then read on where a value or a run of whitespace may continue in the file.
    skip_whitespace, raw_decode = _JSON_WHITESPACE.match, json.JSONDecoder().raw_decode
    pos = window.next_significant(pos + 1)
    text = window.text
    if pos == len(text) or text[pos] != "]":
        while True:
            if pos == len(text):
                raise window.syntax_error("Expecting value", pos)
            try:
                record, end = raw_decode(text, pos)
            except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
                end = len(text)  # a fault, or a cut: the window tells which
            if end >= len(text) - _CUT_OFF_MARGIN:
                record, end, pos = window.decode(raw_decode, pos)
                text = window.text
            if first_wrong_record is None and not isinstance(record, dict):
                first_wrong_record = window.line_col(pos)[0]
                if fail_fast:
                    raise NotAListOfObjects(first_wrong_record)
            delimiter = skip_whitespace(text, end).end()
            if delimiter == len(text):
                delimiter = window.next_significant(end)
                text = window.text
            if delimiter == len(text) or text[delimiter] not in ",]":
                raise window.syntax_error("Expecting ',' delimiter", delimiter)
            if first_wrong_record is None:
                yield record
            if text[delimiter] == "]":
                pos = delimiter
                break
            pos = skip_whitespace(text, delimiter + 1).end()
            if pos == len(text):
                # The comma stays in the window: this Python's json may point at it (see below).
                comma_in_file = window.offset + delimiter
                pos = window.next_significant(pos, keep_from=delimiter)
                text = window.text
                delimiter = comma_in_file - window.offset
            if pos < len(text) and text[pos] == "]":
                message, at_comma = _trailing_comma_fault()
                raise window.syntax_error(message, delimiter if at_comma else pos)
    pos = window.next_significant(pos + 1)
    if pos < len(window.text):
        raise window.syntax_error("Extra data", pos)
    if first_wrong_record is not None:
        raise NotAListOfObjects(first_wrong_record)


@lru_cache(maxsize=1)
def _trailing_comma_fault() -> tuple[str, bool]:
    """How this Python's json reports a comma before a closing bracket: its message, and whether it
    points at the comma (3.13 says "Illegal trailing comma before end of array") or at the bracket
    (earlier versions say "Expecting value")."""
    try:
        json.loads("[{},]")
    except json.JSONDecodeError as exc:
        return exc.msg, exc.pos == 3
    raise AssertionError("json accepted a trailing comma")


def first_json_record_columns(fh: Any, name: str) -> tuple[str, ...]:
    """The keys of the first object of the JSON array in text file ``fh``, reading little beyond that object.

    Validation peeks at sources whose full parse would cost as much as the data (a multi-GB JSON array),
    so only the opening bracket, the first record and the delimiter after it are read and checked; the
    rest of the file is checked when the rows are read at run time. A top level that is not an array is
    reported as such without parsing it. ``name`` prefixes errors, which carry the line and column of
    the fault.
    """
    try:
        first = next(iter_json_records(fh, fail_fast=True), None)
    except JsonSyntaxError as exc:
        raise ValueError(f"{name}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except NotAListOfObjects:
        raise ValueError(f"{name}: a JSON source must be a list of objects") from None
    return () if first is None else tuple(first)


def source_identity(path: Path) -> dict[str, Any]:
    """Content hash of a source file: its node's fingerprint changes exactly when the data does."""
    path = Path(path)
    if not path.exists():
        return {"missing": str(path.name)}
    if not path.is_file():  # a folder or a device: reported by the read; never hashed (/dev/zero never ends)
        return {"not_a_file": str(path.name)}
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def count_rows(path: Path, fmt: str, *, limit: int | None = None) -> int | None:
    """The number of rows a read with the same ``limit`` gives, for estimates. Files are scanned, never
    held, and only as far as the read would go: a parquet file's count is in its metadata; JSON is parsed
    record by record, and a malformed file raises like the read."""
    path = Path(path)
    if not path.is_file():
        return None
    if fmt == "jsonl":
        with path.open("rb") as fh:
            return _count((line for line in fh if line.strip()), limit)
    if fmt == "csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)  # the header
            return _count((row for row in reader if row), limit)  # csv.DictReader skips blank lines too
    if fmt == "parquet":
        import pyarrow.parquet as pq

        count = pq.read_metadata(path).num_rows
        return min(count, limit) if limit else count
    if fmt == "json":
        with path.open(encoding="utf-8") as fh:
            return _count(iter_json_records(fh), limit)
    return None


def _count(items: Iterator[Any], limit: int | None = None) -> int:
    return sum(1 for _ in itertools.islice(items, limit or None))


def read_rows(path: Path, fmt: str, *, id_column: str | None = None, limit: int | None = None,
              display: str | None = None) -> Rows:
    """Read a source into rows, each with a string ``id`` (the id column, or the row number)."""
    return [row for batch in iter_row_batches(path, fmt, id_column=id_column, limit=limit, display=display,
                                              size=None) for row in batch]


def iter_row_batches(path: Path, fmt: str, *, id_column: str | None = None, limit: int | None = None,
                     display: str | None = None, size: int | None = 8192) -> Iterator[Rows]:
    """A source's rows ``size`` at a time (None: all in one batch), each with a string ``id``; ids are
    checked for repeats across the whole file. A JSON array is parsed whole (its records are read in
    batches afterwards); JSON lines, CSV and Parquet are read as they go."""
    path = Path(path)
    display = display or str(path)
    if not path.exists():
        raise RunError(f"source file '{display}' does not exist", hint="check `path:` (relative to the spec file)")
    problem = not_a_data_file(path, fmt)
    if problem:
        raise RunError(f"source '{display}': {problem}",
                       hint="point `path:` at a data file, or set `format: parquet_dir` / `hf_dataset` for a folder")
    ids = IdAssigner(id_column, display, reread=lambda: _records(path, fmt, limit, display))
    batch: Rows = []
    try:
        for record in _records(path, fmt, limit, display):
            batch.append(record)
            if size and len(batch) >= size:
                yield ids.assign(batch)
                batch = []
    except UnicodeDecodeError:
        raise RunError(f"{display}:{utf8_fault_line(path)}: not valid UTF-8 text",
                       hint="save the file as UTF-8") from None
    if batch or not size:
        yield ids.assign(batch)


def _records(path: Path, fmt: str, limit: int | None, display: str) -> Iterator[dict[str, Any]]:
    if fmt == "jsonl":
        yield from _jsonl_records(path, limit, display)
    elif fmt == "csv":
        yield from _csv_records(path, limit, display)
    elif fmt == "json":
        with path.open(encoding="utf-8") as fh:
            try:
                rows = _json_rows(fh, limit)
            except (JsonSyntaxError, json.JSONDecodeError) as exc:
                raise RunError(f"{display}:{exc.lineno}: malformed JSON ({exc.msg})",
                               hint="fix the JSON at that line (or write the data as JSON Lines)") from None
            except NotAListOfObjects as exc:
                where = f":{exc.lineno}" if exc.lineno else ""
                raise RunError(f"{display}{where}: a JSON source must be a list of objects",
                               hint='write [{"id": "a", ...}, ...], or one object per line as .jsonl') from None
        yield from rows
    elif fmt == "parquet":
        yield from _parquet_records(path, limit, display)


# JSON lines parsed per call of the json module: one C parse of many lines instead of a Python call each.
_JSONL_LINES_PER_PARSE = 2048


def _jsonl_records(path: Path, limit: int | None, display: str) -> Iterator[dict[str, Any]]:
    """A JSON-lines file's objects, the first ``limit`` of them. Lines are parsed a few thousand at a time
    as one JSON array; a chunk with any fault (or a line that is not exactly one object) is parsed again
    line by line, which raises the first fault with its line, exactly as a line-by-line read would. No
    line after the ``limit``-th object is read."""
    count = 0
    lineno = 0
    with path.open("rb") as fh:
        while not (limit and count >= limit):
            want = min(_JSONL_LINES_PER_PARSE, limit - count) if limit else _JSONL_LINES_PER_PARSE
            chunk: list[tuple[int, bytes]] = []
            for line in fh:
                lineno += 1
                if line.strip():
                    chunk.append((lineno, line))
                    if len(chunk) >= want:
                        break
            if not chunk:
                return
            try:  # decoded strictly first: json.loads(bytes) would let UTF-8-encoded surrogates through
                rows = json.loads("[" + b",".join(line for _n, line in chunk).decode("utf-8") + "]")
                whole = len(rows) == len(chunk) and all(type(row) is dict for row in rows)
            except (ValueError, RecursionError):  # bad JSON or UTF-8: the line-by-line read names it
                whole = False
            if whole:
                yield from rows
            else:
                for n, line in chunk:
                    yield _jsonl_line(line, n, display)
            count += len(chunk)


def _jsonl_line(line: bytes, lineno: int, display: str) -> dict[str, Any]:
    row = parse_json_line(line, lineno, display, _line_error)
    if not isinstance(row, dict):
        raise RunError(f"{display}:{lineno}: each line must be a JSON object, not {type(row).__name__}",
                       hint='write one object per line: {"id": "a", "question": "..."}')
    return row


def _line_error(message: str) -> RunError:
    return RunError(message, hint="fix or remove that line; each line holds one JSON object")


def _csv_records(path: Path, limit: int | None, display: str) -> Iterator[dict[str, Any]]:
    """A CSV file's rows as dicts keyed by the header. A row with more or fewer fields than the header is
    refused (csv.DictReader would file extras under the key None and fill missing fields with None)."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        repeated = _repeated(header)
        if repeated:
            raise RunError(f"{display}:1: the header names column '{repeated}' twice",
                           hint="rename one of them: each column needs its own name")
        count = 0
        for fields in reader:
            if not fields:
                continue  # a blank line, as csv.DictReader skips it
            if len(fields) != len(header):
                raise RunError(f"{display}:{reader.line_num}: the row has {len(fields)} fields, the header "
                               f"{len(header)}", hint="quote fields that hold commas; give every row every column")
            yield dict(zip(header, fields))
            count += 1
            if limit and count >= limit:
                return


def assign_ids(rows: Rows, id_column: str | None, display: str) -> Rows:
    """Each row with a string ``id``: the id column's value, or the row number; ids must be unique."""
    return IdAssigner(id_column, display).assign(rows)


def _json_rows(fh: Any, limit: int | None) -> Rows:
    """The records of a JSON array source: all of them, or the first ``limit``.

    A whole read parses the file once with the json module's C parser (3-4x faster than the streamed
    reader, and the rows are held anyway). Only a file that is valid JSON but not a list of objects is
    read again, streamed, to name the line of the offending record. A limited read streams and stops.
    """
    if limit:
        return list(itertools.islice(iter_json_records(fh), limit))
    try:
        data = json.load(fh)
    except (RecursionError, ValueError):  # the streamed read below names the line of the fault
        data = None
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    fh.seek(0)
    return list(iter_json_records(fh))  # raises NotAListOfObjects with the record's line


def _parquet_records(path: Path, limit: int | None, display: str) -> Iterator[dict[str, Any]]:
    """A parquet file's rows, decoded a batch at a time (with a limit, only the first batches)."""
    import pyarrow.parquet as pq

    count = 0
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a truncated or foreign file vary
        raise RunError(f"{display}: not a readable Parquet file ({type(exc).__name__}: {str(exc)[:200]})",
                       hint="write the file again (it may be truncated)") from None
    with parquet:
        batches = parquet.iter_batches(batch_size=min(limit, 1 << 16) if limit else 1 << 16)
        while True:
            try:
                batch = next(batches, None)
            except Exception as exc:  # noqa: BLE001 - a damaged row group
                raise RunError(f"{display}: a row group cannot be read ({type(exc).__name__}: {str(exc)[:200]})",
                               hint="write the file again (it may be truncated)") from None
            if batch is None:
                return
            for row in batch.to_pylist():
                yield row
                count += 1
                if limit and count >= limit:
                    return
