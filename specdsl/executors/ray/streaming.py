"""A row-parallel node on Ray, streamed: a Ray Data pipeline over the node's input, one batch at a time.

The local executor reads a node's input ``batch_rows`` rows at a time (rows ``[k*B, (k+1)*B)`` of the
stored table, or of the table in memory), runs the op on each batch and writes each batch of output as
a Parquet part that :class:`~specdsl.execute.batches.TableWriter` merges into ``data.parquet``. Here the
same batches run in Ray workers:

* The driver cuts the input into *spans* of consecutive batches (:func:`plan_spans`, from the Parquet
  footer only) and hands them to Ray Data (``from_items(...).map(...)``, streaming execution, order
  preserved). A span is one batch, except inside a row group much larger than a batch (a table a
  whole-table step committed), where spans grow so that no worker decodes more than twice the rows it
  uses.
* Each worker reads its span's rows straight from the stored ``data.parquet`` (so the store must be at the
  same path on every Ray node: shared storage), cuts them into exactly the local executor's batches,
  runs the op on each and writes each non-empty output batch as a part into the node's staging folder.
  An input that is in the driver's memory (an upstream step that ran whole this run) travels instead
  as one object-store ref per batch.
* Back on the driver come only (part path, rows, JSON-text columns) per batch, in input order; the
  driver adopts the parts into a ``TableWriter`` and merges them as the local executor does. So the
  table, its row order, ids and even its bytes are the local executor's, and the driver never holds
  more than a batch of rows (while merging) nor the input at all.

An op's exception comes back as data and is raised again on the driver as itself (the local RunError);
a Ray-level failure (a worker that died after Ray's retries) is a RunError naming the node's rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from specdsl.errors import RunError
from specdsl.executors.ray.connect import ENV_MAX_IN_FLIGHT, INSTALL_HINT, NODE_HINT
from specdsl.executors.ray.transport import capture_error, describe_ray_error, raise_again

Rows = list[dict[str, Any]]
PARTS = ".ray-parts"  # inside the node's staging folder; removed before the commit
SHARED_HINT = ("put the run store on storage every Ray node mounts at the same path (--store /shared/...); "
               "a private local Ray instance always sees it")


# --------------------------------------------------------------------------------------------------
# Planning (driver)
# --------------------------------------------------------------------------------------------------


def plan_spans(group_rows: Sequence[int], batch: int) -> list[tuple[int, int]]:
    """Spans ``[first, stop)`` of batch indexes covering a table whose row groups hold ``group_rows``
    rows, batches being rows ``[k*batch, (k+1)*batch)``.

    A worker decodes its span from the start of the row group that holds the span's first row, so a span
    that starts ``skip`` rows into its group is given at least ``skip`` rows of its own (the table's last
    span joins the one before when the table ends first): the rows decoded and dropped never outnumber
    the rows used. Row groups no larger than a batch (what a streamed node
    writes) give one span per batch.
    """
    total = sum(group_rows)
    batches = math.ceil(total / batch)
    starts, at = [], 0
    for n in group_rows:
        starts.append(at)
        at += n
    spans: list[tuple[int, int]] = []
    group, first = 0, 0
    while first < batches:
        row = first * batch
        while group + 1 < len(starts) and starts[group + 1] <= row:
            group += 1
        skip = row - starts[group]
        stop = first + max(1, math.ceil(skip / batch))
        if stop > batches and spans:  # the table ends before this span could pay for its skip: the
            first = spans.pop()[0]    # span before (whose skip its rows already cover) takes it on
        spans.append((first, min(stop, batches)))
        first = min(stop, batches)
    return spans


# --------------------------------------------------------------------------------------------------
# The work (Ray workers)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanJob:
    """What every task of one node needs: the op bound to its params (``fn(rows) -> rows``), where the
    input is (a stored table and its JSON-text columns, or one ref per batch), the batch size and the
    folder the parts go to."""

    fn: Callable[[Rows], Any]
    batch: int
    parts_dir: str
    table: str | None = None
    json_columns: tuple[str, ...] = ()
    batch_refs: tuple[Any, ...] = ()


def run_span(item: dict[str, Any], job: SpanJob) -> dict[str, Any]:
    """One span: each of its batches through the op, each non-empty output written as a part. Returns
    ``{"outcome": pickle of ("ok", [(part or None, rows, json_columns, meta), ...]) or ("error", info)}``
    (``meta``: what ``fn`` returned beside the rows, a batch's summary, or ``{}``): an exception travels
    as data, so it is raised on the driver as itself, never as a Ray traceback."""
    from specdsl.execute.store import write_table

    first, stop = int(item["first"]), int(item["stop"])
    try:
        written = []
        for index, rows in zip(range(first, stop), _span_batches(job, first, stop)):
            result = job.fn(rows)
            out, meta = result if isinstance(result, tuple) else (result, {})
            if not out:  # as TableWriter.write: an empty batch of output leaves no part
                written.append((None, 0, [], meta))
                continue
            part = Path(job.parts_dir) / f"{index:09d}-{uuid.uuid4().hex[:8]}.parquet"
            written.append((str(part), len(out), write_table(part, out), meta))
        outcome: tuple[str, Any] = ("ok", written)
    except BaseException as exc:  # noqa: BLE001 - travels back and is raised again in the driver
        outcome = ("error", capture_error(exc))
    return {"outcome": pickle.dumps(outcome)}


def _span_batches(job: SpanJob, first: int, stop: int) -> Iterator[Rows]:
    for needed in ([job.parts_dir] if job.table is None else [job.table, job.parts_dir]):
        if not Path(needed).exists():
            import socket

            raise RunError(f"the run store is not visible on Ray node {socket.gethostname()}: {needed} is "
                           "missing there", hint=SHARED_HINT)
    if job.table is None:
        import ray

        for ref in job.batch_refs[first:stop]:
            yield ray.get(ref)
        return
    columns = list(job.json_columns)
    for table in read_span(Path(job.table), job.batch, first, stop):
        rows = table.to_pylist()
        if columns:  # decoded exactly as Store.iter_batches decodes them
            for row in rows:
                for c in columns:
                    if row.get(c) is not None:
                        row[c] = json.loads(row[c])
        yield rows


def read_span(path: Path, batch: int, first: int, stop: int) -> Iterator[Any]:
    """Rows ``[first*batch, stop*batch)`` of a Parquet file as Arrow tables of ``batch`` rows (the last
    may be shorter): the batches ``ParquetFile.iter_batches(batch_size=batch)`` yields from the file's
    start, read from the row group that holds the first row on (peak memory: about two batches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        meta = parquet.metadata
        start, end = first * batch, min(stop * batch, meta.num_rows)
        group, offset = 0, 0
        while group < meta.num_row_groups and offset + meta.row_group(group).num_rows <= start:
            offset += meta.row_group(group).num_rows
            group += 1
        if start >= end:
            return
        skip, wanted = start - offset, end - start
        pending: list[Any] = []
        buffered = 0
        for record_batch in parquet.iter_batches(batch_size=batch, row_groups=range(group, meta.num_row_groups)):
            if skip:
                if record_batch.num_rows <= skip:
                    skip -= record_batch.num_rows
                    continue
                record_batch, skip = record_batch.slice(skip), 0
            record_batch = record_batch.slice(0, wanted)
            wanted -= record_batch.num_rows
            pending.append(record_batch)
            buffered += record_batch.num_rows
            while buffered >= batch:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, batch)
                rest = table.slice(batch)
                pending, buffered = rest.to_batches(), rest.num_rows
            if wanted <= 0:
                break
        if buffered:
            yield pa.Table.from_batches(pending)


# --------------------------------------------------------------------------------------------------
# Driving the pipeline (driver)
# --------------------------------------------------------------------------------------------------


def stream_node(executor: Any, fn: Callable[[Rows], Any], staging: Path, batch: int, *, rows: Rows | None = None,
                table: Path | None = None,
                json_columns: Sequence[str] = ()) -> tuple[int, list[str], list[dict[str, Any]]]:
    """Run ``fn`` over the input (``rows`` in memory, or the stored ``table``) one batch at a time in Ray
    workers; leave the output in ``staging/data.parquet``. Returns (rows written, JSON-text columns, and
    per batch in input order what ``fn`` returned beside the rows: ``{}`` for a plain list of rows)."""
    from specdsl.execute.batches import TableWriter

    writer = TableWriter(staging)
    metas: list[dict[str, Any]] = []
    parts_dir = Path(staging) / PARTS
    parts_dir.mkdir(parents=True, exist_ok=True)
    try:
        if rows is not None:
            spans = [(k, k + 1) for k in range(math.ceil(len(rows) / batch))]
        else:
            spans = plan_spans(_row_groups(table), batch)
        if spans:
            ray = executor.ray()
            refs: tuple[Any, ...] = ()
            if rows is not None:
                refs = tuple(ray.put(rows[i:i + batch]) for i in range(0, len(rows), batch))
            job = SpanJob(fn=fn, batch=batch, parts_dir=str(parts_dir), table=None if table is None else str(table),
                          json_columns=tuple(json_columns), batch_refs=refs)
            with contextlib.closing(_pipeline(executor, job, spans)) as outcomes:  # closed: Ray Data stops
                for outcome in outcomes:
                    kind, value = pickle.loads(outcome)
                    if kind == "error":
                        raise_again(value)
                    for part, n, columns, meta in value:
                        metas.append(meta)
                        if part is not None:
                            writer.add_part(Path(part), n, columns)
        return writer.rows, writer.close(), metas
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)  # parts of retried tasks; never part of the commit


def _row_groups(table: Path) -> list[int]:
    import pyarrow.parquet as pq

    meta = pq.read_metadata(table)
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def _pipeline(executor: Any, job: SpanJob, spans: list[tuple[int, int]]) -> Iterator[bytes]:
    """Ray Data's streaming execution over the spans: yields each span's outcome, in input order."""
    try:
        import ray.data
    except ImportError as exc:
        raise RunError(f"the ray executor needs Ray Data, which is not importable here ({exc})",
                       hint=INSTALL_HINT) from None
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    context.execution_options.preserve_order = True  # the table's rows in input order, as local writes them
    context.enable_progress_bars = False             # specdsl draws its own progress
    data_logger.setLevel(logging.CRITICAL)        # its errors come back as one RunError, not a traceback
    options: dict[str, Any] = {"num_cpus": executor._cpus_per_task()}
    if executor._gpus_per_task():
        options["num_gpus"] = executor._gpus_per_task()
    limit = executor._setting("max_in_flight", ENV_MAX_IN_FLIGHT, int)
    if limit:
        options["concurrency"] = limit
    items = [{"first": a, "stop": b} for a, b in spans]
    stream = None
    try:
        with warnings.catch_warnings():
            # Ray's usual 3 retries for a dead worker (a row task is pure), not Ray Data's endless ones: a
            # batch that kills its worker every time fails the step instead of hanging the run. Ray 2.60
            # names no parameter for it and warns that the generic one is deprecated.
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = ray.data.from_items(items, override_num_blocks=len(items)).map(
                run_span, fn_kwargs={"job": job}, max_retries=3, **options)
        stream = dataset.iter_rows()
        for out in stream:
            yield out["outcome"]
    except Exception as exc:  # noqa: BLE001 - a Ray-level failure: a worker died after Ray's retries
        raise RunError(f"a Ray Data task for this step failed: {describe_ray_error(exc)}",
                       hint=f"a worker that runs out of memory on a batch of {job.batch} rows: lower "
                            f"SPECDSL_BATCH_ROWS; else {NODE_HINT} (Ray's logs: /tmp/ray/session_latest/logs "
                            "on the node)") from None
    finally:
        if stream is not None and hasattr(stream, "close"):
            stream.close()  # stops the streaming executor when we leave early (an op's error, Ctrl-C)
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        data_logger.setLevel(saved_level)
