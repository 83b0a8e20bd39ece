"""Tables that stream: a node's output written batch by batch, and read back batch by batch.

A row-parallel op (``row_parallel = True``) runs on one batch of its input at a time and each batch of
output goes to disk as it comes, so peak memory is set by the batch size, not by the table. The store's
layout does not change: :class:`TableWriter` writes each batch as a row group of the one
``data.parquet`` that every reader already knows (through Parquet parts merged at the end when the
batches' schemas differ). A column may come out as JSON text in one batch (chat content that is
sometimes a list of parts) and as a plain column in another: the merge stores it as JSON text
throughout, as the store does for a whole table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

Rows = list[dict[str, Any]]

# Rows per batch: small enough that a batch of long texts stays in tens of MB, large enough that the
# per-batch costs (a Parquet part, a Python call into the op) vanish. SPECDSL_BATCH_ROWS overrides it.
DEFAULT_BATCH_ROWS = 8192


def batch_rows() -> int:
    try:
        return max(1, int(os.environ.get("SPECDSL_BATCH_ROWS", DEFAULT_BATCH_ROWS)))
    except ValueError:
        return DEFAULT_BATCH_ROWS


def chunks(rows: list[dict[str, Any]], size: int) -> Iterator[Rows]:
    """Consecutive slices of ``rows`` (a table already in memory), ``size`` rows each."""
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def canonical_schema(schema: Any) -> Any:
    """``schema`` with every list's item field named ``item``, as ``pyarrow.array`` names it. A table read
    back from Parquet names it ``element``; without this, the same rows written from Python rows or from
    stored batches (the Arrow fast paths, a Ray worker's parts) would differ in the file's bytes."""
    import pyarrow as pa

    def fix(t: Any) -> Any:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            item = t.value_field
            field = pa.field("item", fix(item.type), item.nullable, item.metadata)
            return pa.large_list(field) if pa.types.is_large_list(t) else pa.list_(field)
        if pa.types.is_fixed_size_list(t):
            item = t.value_field
            return pa.list_(pa.field("item", fix(item.type), item.nullable, item.metadata), t.list_size)
        if pa.types.is_struct(t):
            return pa.struct([f.with_type(fix(f.type)) for f in t])
        return t

    return pa.schema([f.with_type(fix(f.type)) for f in schema], metadata=schema.metadata)


class TableWriter:
    """Writes a table batch by batch into ``folder``; :meth:`close` leaves ``folder/name`` and returns
    (rows written, the columns stored as JSON text).

    While every batch has the first one's schema and JSON-text columns (the common case) the batches go
    straight into ``name``, one row group each. The first batch that differs (a column that was all null
    so far, one that became JSON text) turns what was written into the first part, and the rest are
    written as parts that :meth:`close` merges under the unified schema.
    """

    def __init__(self, folder: Path, name: str = "data.parquet"):
        self.folder, self.name = Path(folder), name
        self._parts: list[tuple[Path, list[str]]] = []
        self._direct: Any = None            # the open pq.ParquetWriter while batches share a schema
        self._direct_key: Any = None        # (schema, json columns) of that writer
        self.rows = 0

    def write(self, rows: Rows) -> None:
        """Write a batch of row dicts (stored as :func:`specdsl.execute.store.write_table` would)."""
        from specdsl.execute.store import rows_to_table

        if not rows:
            return
        table, json_columns = rows_to_table(rows)
        self.write_arrow(table, json_columns)

    def write_arrow(self, table: Any, json_columns: Iterable[str] = ()) -> None:
        """Write a batch already in the store's form: an Arrow table whose ``json_columns`` hold JSON text."""
        import pyarrow.parquet as pq

        if table.num_rows == 0:
            return
        canonical = canonical_schema(table.schema)
        # A batch read back from Parquet names list items 'element'. Schema.equals ignores those names, and
        # the file keeps them: compare the text.
        if canonical.to_string() != table.schema.to_string():
            table = table.cast(canonical)
        json_columns = [c for c in table.column_names if c in set(json_columns)]
        key = (table.schema, tuple(json_columns))
        self.rows += table.num_rows
        if not self._parts and self._direct is None:
            self._direct = pq.ParquetWriter(self.folder / self.name, table.schema)
            self._direct_key = key
        if self._direct is not None and key[1] == self._direct_key[1] and key[0].equals(self._direct_key[0]):
            self._direct.write_table(table)
            return
        if self._direct is not None:  # the schema changed: what went straight in becomes the first part
            self._direct.close()
            self._direct = None
            first = self.folder / ".part-000000.parquet"
            os.replace(self.folder / self.name, first)
            self._parts.append((first, list(self._direct_key[1])))
        part = self.folder / f".part-{len(self._parts):06d}.parquet"
        pq.write_table(table, part)
        self._parts.append((part, json_columns))

    def add_part(self, part: Path, rows: int, json_columns: list[str]) -> None:
        """Take a part another process wrote (a Ray worker, with :func:`specdsl.execute.store.write_table`,
        somewhere in this folder) as the next batch: :meth:`close` merges it like the parts of ``write``."""
        self._parts.append((Path(part), list(json_columns)))
        self.rows += rows

    def close(self) -> list[str]:
        """Finish the file (merging the parts under one schema, one row group per part); returns the
        JSON-text columns."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from specdsl.execute.store import write_table

        target = self.folder / self.name
        if self._direct is not None:
            self._direct.close()
            self._direct = None
            return list(self._direct_key[1])
        if not self._parts:
            write_table(target, [])
            return []
        json_columns = sorted({c for _part, cols in self._parts for c in cols})
        schemas = []
        for part, _cols in self._parts:  # footers only: the data is read once, below
            part_schema = pq.read_schema(part)
            for name in json_columns:
                if name in part_schema.names:
                    i = part_schema.get_field_index(name)
                    part_schema = part_schema.set(i, pa.field(name, pa.string()))
            schemas.append(part_schema)
        schema = canonical_schema(pa.unify_schemas(schemas, promote_options="permissive"))
        with pq.ParquetWriter(target, schema) as writer:
            for part, cols in self._parts:
                with pq.ParquetFile(part) as parquet:
                    for group in range(parquet.num_row_groups):  # a batch at a time, never a whole part
                        table = self._as_json(parquet.read_row_group(group), cols, json_columns)
                        for name in schema.names:  # a column some batches lack is null there
                            if name not in table.column_names:
                                table = table.append_column(name, pa.nulls(table.num_rows,
                                                                           schema.field(name).type))
                        writer.write_table(table.select(schema.names).cast(schema))
                part.unlink()
        return [name for name in schema.names if name in json_columns]  # in column order, as a direct write

    @staticmethod
    def _as_json(table: Any, part_json: Iterable[str], json_columns: list[str]) -> Any:
        """``table`` with every column that is JSON text anywhere stored as JSON text here too."""
        from specdsl.execute.columns import string_array

        part_json = set(part_json)
        for name in json_columns:
            if name in part_json or name not in table.column_names:
                continue
            values = table.column(name).to_pylist()
            encoded = string_array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values])
            table = table.set_column(table.column_names.index(name), name, encoded)
        return table
