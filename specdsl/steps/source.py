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
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or (data and not isinstance(data[0], dict)):
            raise ValueError(f"{path.name}: a JSON source must be a list of objects")
        return tuple(data[0]) if data else ()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return tuple(pq.read_schema(path).names)
    raise ValueError(f"unknown format {fmt!r}")


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
