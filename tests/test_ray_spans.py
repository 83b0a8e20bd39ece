"""How the Ray executor cuts a stored table into the local executor's batches (no Ray needed): the spans
cover every batch once, in order, and decode at most twice the rows they use; reading a span gives
exactly the batches ``ParquetFile.iter_batches`` gives from the file's start, whatever the row groups."""

from __future__ import annotations

import math
import random

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from specdsl.executors.ray.streaming import plan_spans, read_span  # noqa: E402


def _write(path, group_rows):
    table = pa.table({"i": list(range(sum(group_rows))), "s": [f"row {i}" for i in range(sum(group_rows))]})
    with pq.ParquetWriter(path, table.schema) as writer:
        at = 0
        for n in group_rows:
            writer.write_table(table.slice(at, n))
            at += n
    return table


LAYOUTS = [
    [7, 23, 1, 69],             # ragged groups around a batch of 10
    [100],                      # one group, whole table
    [10] * 10,                  # groups the size of a batch
    [3] * 33 + [1],             # groups far smaller than a batch (a filter's streamed output)
    [1000, 5, 300],             # a group far larger than a batch (a table committed whole)
]


@pytest.mark.parametrize("group_rows", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 10, 64, 5000])
def test_spans_read_the_local_batches(tmp_path, group_rows, batch):
    path = tmp_path / "t.parquet"
    _write(path, group_rows)
    local = [b.to_pylist() for b in pq.ParquetFile(path).iter_batches(batch_size=batch)]
    spans = plan_spans(group_rows, batch)
    assert spans[0][0] == 0 and spans[-1][1] == math.ceil(sum(group_rows) / batch)
    assert all(a < b and b == c for (a, b), (c, _d) in zip(spans, spans[1:]))
    remote = [t.to_pylist() for first, stop in spans for t in read_span(path, batch, first, stop)]
    assert remote == local


def test_decoded_rows_never_outnumber_used_rows_twice():
    rng = random.Random(4)
    for _ in range(200):
        groups = [rng.choice([1, 5, 64, 1000, 9000]) for _ in range(rng.randint(1, 6))]
        batch = rng.choice([1, 8, 100, 512])
        starts = [sum(groups[:g]) for g in range(len(groups))]
        for first, stop in plan_spans(groups, batch):
            row = first * batch
            group_start = max(s for s in starts if s <= row)
            used = min(stop * batch, sum(groups)) - row
            assert row - group_start <= max(used, batch), (groups, batch, first, stop)


def test_small_groups_give_one_span_per_batch():
    assert plan_spans([8] * 12, 16) == [(k, k + 1) for k in range(6)]
    assert plan_spans([], 16) == []
    assert plan_spans([1 << 20], 8192)[:5] == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16)]
