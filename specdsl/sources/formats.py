"""The built-in source formats, registered through ``register_sources`` like any plugin's.

* ``jsonl``, ``json``, ``csv``, ``parquet``: one file (the readers in :mod:`specdsl.sources.files`).
* ``parquet_dir``: a folder of Parquet files (``*.parquet``, read in name order), as Spark, DuckDB and
  ``datasets.Dataset.to_parquet`` shards write them.
* ``hf_dataset``: a dataset saved by ``datasets.Dataset.save_to_disk`` (``state.json``,
  ``dataset_info.json`` and Arrow files). Read with pyarrow; the ``datasets`` package is not needed.

Columns come from the cheapest place that has them (a header, a first record, a Parquet footer, the
dataset's ``dataset_info.json``), so ``specdsl validate`` reads next to nothing.
"""

from __future__ import annotations

import abc

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from specdsl.errors import RunError
from specdsl.sources import files
from specdsl.sources.ids import IdAssigner

Rows = list[dict[str, Any]]


class _FileSource:
    """One of the single-file formats of :mod:`specdsl.sources.files`."""

    def __init__(self, name: str, suffixes: tuple[str, ...]):
        self.name, self.suffixes = name, suffixes

    def columns(self, path: Path) -> tuple[str, ...]:
        return files.peek_columns(path, self.name)

    def count(self, path: Path, *, limit: int | None = None) -> int | None:
        return files.count_rows(path, self.name, limit=limit)

    def read(self, path: Path, *, id_column: str | None = None, limit: int | None = None,
             display: str | None = None) -> Rows:
        if Path(path).is_dir():
            raise RunError(f"source '{display or path}' is a folder, not a {self.name} file",
                           hint="point `path:` at the file, or set `format: parquet_dir` / `hf_dataset` for a folder")
        return files.read_rows(path, self.name, id_column=id_column, limit=limit, display=display)

    def iter_batches(self, path: Path, *, id_column: str | None = None, limit: int | None = None,
                     display: str | None = None, size: int = 8192) -> Iterator[Rows]:
        if Path(path).is_dir():
            self.read(path, display=display)  # the same error as a whole read
        yield from files.iter_row_batches(path, self.name, id_column=id_column, limit=limit, display=display,
                                          size=size)

    def identity(self, path: Path) -> Mapping[str, Any]:
        return files.source_identity(path)


JSONL = _FileSource("jsonl", (".jsonl", ".ndjson"))
JSON = _FileSource("json", (".json",))
CSV = _FileSource("csv", (".csv",))
PARQUET = _FileSource("parquet", (".parquet", ".pq"))


def _folder_identity(paths: list[Path], root: Path) -> dict[str, Any]:
    """Content hash over a folder's data files (names and bytes): it changes exactly when the data does."""
    if not root.is_dir():
        return {"missing": root.name}
    h = hashlib.sha256()
    size = 0
    for p in paths:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        size += p.stat().st_size
    return {"sha256": h.hexdigest(), "bytes": size, "files": len(paths)}


def _ids(batches: Callable[[], Iterator[Any]], id_column: str | None, display: str,
         limit: int | None) -> "IdAssigner":
    """The id checker of a read of ``batches()``, able to read the same records again from the start."""

    def reread() -> Iterator[dict[str, Any]]:
        records = (row for batch in batches() for row in batch.to_pylist())
        return itertools.islice(records, limit) if limit else records

    return IdAssigner(id_column, display, reread=reread)


def _limited(batches: Iterator[Any], limit: int | None, ids: "IdAssigner",
             size: int | None) -> Iterator[Rows]:
    """Arrow record batches -> batches of rows with ids, at most ``limit`` rows in all."""
    pending: Rows = []
    taken = 0
    for batch in batches:
        rows = batch.to_pylist()
        if limit:
            rows = rows[: limit - taken]
        taken += len(rows)
        pending += rows
        while size and len(pending) >= size:
            yield ids.assign(pending[:size])
            pending = pending[size:]
        if limit and taken >= limit:
            break
    if pending or not size:
        yield ids.assign(pending)


class _FolderSource(abc.ABC):
    """What the folder formats share: a whole read is the batched read flattened."""

    def read(self, path: Path, *, id_column: str | None = None, limit: int | None = None,
             display: str | None = None) -> Rows:
        return [row for rows in self.iter_batches(path, id_column=id_column, limit=limit, display=display, size=0)
                for row in rows]

    @abc.abstractmethod
    def iter_batches(self, path: Path, **options: Any) -> Iterator[Rows]:
        """The rows ``size`` at a time (0: one batch); each folder format reads its own files."""


def _unreadable(display: str, exc: Exception) -> RunError:
    return RunError(f"source '{display}': {exc if isinstance(exc, ValueError) else 'does not exist'}",
                    hint="check `path:` (relative to the spec file)")


class ParquetFolderSource(_FolderSource):
    """A folder of Parquet files with one schema, read as one table in file-name order."""

    name = "parquet_dir"
    suffixes: tuple[str, ...] = ()

    @staticmethod
    def matches(path: Path) -> bool:
        return path.is_dir() and any(path.glob("*.parquet"))

    @staticmethod
    def _files(path: Path) -> list[Path]:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(path)
        if not path.is_dir():
            raise ValueError(f"'{path.name}' is a file; format parquet_dir reads a folder of Parquet files")
        found = sorted(p for p in path.glob("*.parquet") if p.is_file())  # never a device or pipe
        if not found:
            raise ValueError(f"folder '{path.name}' holds no *.parquet file")
        return found

    def columns(self, path: Path) -> tuple[str, ...]:
        import pyarrow.parquet as pq

        return tuple(pq.read_schema(self._files(path)[0]).names)

    def count(self, path: Path, *, limit: int | None = None) -> int | None:
        import pyarrow.parquet as pq

        total = sum(pq.ParquetFile(p).metadata.num_rows for p in self._files(path))
        return min(total, limit) if limit else total

    def iter_batches(self, path: Path, *, id_column: str | None = None, limit: int | None = None,
                     display: str | None = None, size: int = 8192) -> Iterator[Rows]:
        import pyarrow.parquet as pq

        display = display or str(path)
        try:
            parts = self._files(path)
        except (FileNotFoundError, ValueError) as exc:
            raise _unreadable(display, exc) from None
        expected = pq.read_schema(parts[0])

        def batches() -> Iterator[Any]:
            for part in parts:
                with pq.ParquetFile(part) as parquet:
                    if parquet.schema_arrow.names != expected.names:
                        raise RunError(f"{display}/{part.name}: its columns ({', '.join(parquet.schema_arrow.names)}) "
                                       f"differ from {parts[0].name}'s ({', '.join(expected.names)})",
                                       hint="every Parquet file of a parquet_dir source has the same columns")
                    yield from parquet.iter_batches(batch_size=1 << 16)

        yield from _limited(batches(), limit, _ids(batches, id_column, display, limit), size)

    def identity(self, path: Path) -> Mapping[str, Any]:
        path = Path(path)
        return _folder_identity(sorted(p for p in path.glob("*.parquet") if p.is_file()) if path.is_dir() else [],
                                path)


class SavedDatasetSource(_FolderSource):
    """A dataset saved by ``datasets.Dataset.save_to_disk``: Arrow IPC stream files listed in state.json."""

    name = "hf_dataset"
    suffixes: tuple[str, ...] = ()

    @staticmethod
    def matches(path: Path) -> bool:
        return path.is_dir() and (path / "state.json").is_file()

    @staticmethod
    def _state(path: Path) -> tuple[dict[str, Any], list[Path]]:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(path)
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
            raise ValueError(f"'{path.name}' holds a DatasetDict (splits: {', '.join(splits)}); point `path:` at one "
                             f"split's folder, e.g. {path.name}/{splits[0] if splits else 'train'}")
        state_file = path / "state.json"
        if not state_file.is_file():
            raise ValueError(f"'{path.name}' is not a folder written by datasets' save_to_disk (no state.json)")
        state = json.loads(state_file.read_text(encoding="utf-8"))
        data = [path / f["filename"] for f in state.get("_data_files", [])]
        missing = [p.name for p in data if not p.is_file()]
        if missing:
            raise ValueError(f"'{path.name}' lists data files that are not there: {', '.join(missing)}")
        return state, data

    def columns(self, path: Path) -> tuple[str, ...]:
        _state, data = self._state(path)
        info = Path(path) / "dataset_info.json"
        if info.is_file():  # no pyarrow needed: validate stays on the light core
            features = json.loads(info.read_text(encoding="utf-8")).get("features")
            if isinstance(features, dict) and features:
                return tuple(features)
        import pyarrow as pa

        with pa.memory_map(str(data[0])) as source:
            return tuple(pa.ipc.open_stream(source).schema.names)

    def count(self, path: Path, *, limit: int | None = None) -> int | None:
        import pyarrow as pa

        _state, data = self._state(path)
        total = 0
        for part in data:
            with pa.memory_map(str(part)) as source:
                for batch in pa.ipc.open_stream(source):
                    total += batch.num_rows
                    if limit and total >= limit:
                        return limit
        return total

    def iter_batches(self, path: Path, *, id_column: str | None = None, limit: int | None = None,
                     display: str | None = None, size: int = 8192) -> Iterator[Rows]:
        import pyarrow as pa

        display = display or str(path)
        try:
            _state, data = self._state(path)
        except (FileNotFoundError, ValueError) as exc:
            raise _unreadable(display, exc) from None

        def batches() -> Iterator[Any]:
            for part in data:
                try:
                    with pa.memory_map(str(part)) as source:
                        yield from pa.ipc.open_stream(source)
                except pa.ArrowInvalid as exc:
                    raise RunError(f"{display}/{part.name}: not a readable Arrow file ({exc})",
                                   hint="save the dataset again with save_to_disk") from None

        yield from _limited(batches(), limit, _ids(batches, id_column, display, limit), size)

    def identity(self, path: Path) -> Mapping[str, Any]:
        path = Path(path)
        try:
            _state, data = self._state(path)
        except (FileNotFoundError, ValueError):
            return {"missing": path.name}
        return _folder_identity(data, path)


SOURCES = (JSONL, JSON, CSV, PARQUET, ParquetFolderSource(), SavedDatasetSource())

