"""The training table: checked and counted with pyarrow before any model loads, then read for TRL.

A target trains on a Parquet table of pre-tokenized samples (``input_ids``, ``labels`` with -100 where no
loss is taken, optionally ``attention_mask``). :func:`inspect_dataset` streams it once, so a bad table
fails in a second with the row at fault, and counts what the model card reports (:class:`DataStats`);
:func:`load_training_dataset` reads it as a ``datasets.Dataset`` cleaned exactly as those counts say.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from specdsl.designs.masking import IGNORE_INDEX
from specdsl.errors import RunError


@dataclass
class DataStats:
    """What inspect_dataset counted in the table (the model card and specdsl_train.json report it)."""

    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    fully_masked_rows: int = 0       # rows with no trained token: dropped (they cost compute, add no loss)
    rows_over_max_length: int = 0    # cut to max_length (keep the start)
    padded_positions: int = 0        # attention_mask == 0 positions: removed before training
    has_attention_mask: bool = False
    max_length: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_dataset(path: Path, *, vocab_size: int | None = None, max_length: int | None = None) -> DataStats:
    """Check the Parquet table a target trains on and count what the card reports.

    Streams record batches, so a large table is checked in bounded memory. Every problem is a RunError
    naming the file and, where one row is at fault, its index.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise RunError(f"training dataset {path} does not exist")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise RunError(f"training dataset {path} is not a readable Parquet file: {exc}") from exc
    schema = pf.schema_arrow
    missing = [c for c in ("input_ids", "labels") if c not in schema.names]
    if missing:
        raise RunError(
            f"training dataset {path} lacks column(s) {', '.join(missing)} (has: {', '.join(schema.names) or 'none'})",
            hint="a train step needs pre-tokenized samples: input_ids and labels (-100 = no loss), "
                 "as the tokenize step writes them")
    cols = ["input_ids", "labels"]
    if "attention_mask" in schema.names:
        cols.append("attention_mask")
    for c in cols:
        t = schema.field(c).type
        if not ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
                and pa.types.is_integer(t.value_type)):
            raise RunError(f"training dataset {path}: column {c} has type {t}, expected a list of integers")

    stats = DataStats(has_attention_mask="attention_mask" in cols, max_length=max_length)
    offset = 0
    for batch in pf.iter_batches(batch_size=2048, columns=cols):
        n = batch.num_rows
        ids, labels = batch.column("input_ids"), batch.column("labels")
        for name, col in (("input_ids", ids), ("labels", labels)):
            if col.null_count:
                row = offset + int(np.flatnonzero(np.asarray(col.is_null()))[0])
                raise RunError(f"training dataset {path}: row {row} has no {name} (null)")
        lens = np.asarray(pc.list_value_length(ids), dtype=np.int64)
        llens = np.asarray(pc.list_value_length(labels), dtype=np.int64)
        bad = np.flatnonzero(lens != llens)
        if bad.size:
            r = int(bad[0])
            raise RunError(f"training dataset {path}: row {offset + r} has {lens[r]} input_ids but "
                           f"{llens[r]} labels", hint="labels must align one to one with input_ids")
        empty = np.flatnonzero(lens == 0)
        if empty.size:
            raise RunError(f"training dataset {path}: row {offset + int(empty[0])} is empty (no tokens)")
        flat_ids = np.asarray(pc.list_flatten(ids), dtype=np.int64)
        flat_labels = np.asarray(pc.list_flatten(labels), dtype=np.int64)
        keep = np.ones(flat_ids.shape, dtype=bool)
        if stats.has_attention_mask:
            am = batch.column("attention_mask")
            alens = np.asarray(pc.list_value_length(am), dtype=np.int64)
            bad = np.flatnonzero(alens != lens)
            if bad.size:
                r = int(bad[0])
                raise RunError(f"training dataset {path}: row {offset + r} has {lens[r]} input_ids but "
                               f"{alens[r]} attention_mask values")
            keep = np.asarray(pc.list_flatten(am), dtype=np.int64) != 0
            stats.padded_positions += int((~keep).sum())
        if vocab_size is not None and flat_ids.size:
            lo, hi = int(flat_ids.min()), int(flat_ids.max())
            if lo < 0 or hi >= vocab_size:
                raise RunError(f"training dataset {path}: token id {hi if hi >= vocab_size else lo} is outside "
                               f"the model's vocabulary (size {vocab_size})",
                               hint="the dataset was tokenized with another tokenizer than the base model's")
        trained = (flat_labels != IGNORE_INDEX) & keep
        if vocab_size is not None and trained.any():
            lab = flat_labels[trained]
            if int(lab.min()) < 0 or int(lab.max()) >= vocab_size:
                raise RunError(f"training dataset {path}: a label outside the vocabulary (size {vocab_size}) "
                               "and not -100")
        parents = np.repeat(np.arange(n), lens)
        kept_len = np.bincount(parents[keep], minlength=n) if stats.has_attention_mask else lens
        per_row_trained = np.bincount(parents[trained], minlength=n)
        if max_length is not None:
            # Trained tokens past the cut are lost: count rows whose every trained token lies past it.
            pos = np.arange(flat_ids.size) - np.repeat(np.cumsum(lens) - lens, lens)
            if stats.has_attention_mask:  # positions count kept tokens only
                kept_cum = np.cumsum(keep) - 1
                row_start = np.repeat(np.concatenate(([0], np.cumsum(kept_len)[:-1])), lens)
                pos = kept_cum - row_start
            per_row_trained = np.bincount(parents[trained & (pos < max_length)], minlength=n)
            stats.rows_over_max_length += int((kept_len > max_length).sum())
        stats.rows += n
        stats.tokens += int(np.minimum(kept_len, max_length).sum() if max_length else kept_len.sum())
        stats.trained_tokens += int(per_row_trained.sum())
        stats.longest = max(stats.longest, int(np.minimum(kept_len, max_length or 1 << 62).max()))
        stats.fully_masked_rows += int((per_row_trained == 0).sum())
        offset += n
    if stats.rows == 0:
        raise RunError(f"training dataset {path} is empty (0 rows)",
                       hint="an upstream filter step may have removed every row")
    if stats.trained_tokens == 0:
        cut = f" within max_length={max_length}" if max_length else ""
        raise RunError(f"training dataset {path}: every label is -100{cut}: there is nothing to train on",
                       hint="check the loss/mask policy of the step that produced the dataset")
    return stats


def load_training_dataset(path: Path, stats: DataStats, cache_dir: Path):
    """The Parquet table as a datasets.Dataset of input_ids + labels, cleaned as the card reports.

    Positions with attention_mask == 0 are removed (TRL builds its own masks and would otherwise attend to
    them), samples are cut to max_length, and samples without a trained token are dropped.
    """
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir))
    max_length = stats.max_length
    needs_fix = stats.padded_positions > 0 or (max_length is not None and stats.rows_over_max_length > 0)
    if needs_fix:
        has_mask = stats.has_attention_mask

        def fix(batch):
            out_ids, out_labels = [], []
            masks = batch["attention_mask"] if has_mask else [None] * len(batch["input_ids"])
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], masks):
                if mask is not None and 0 in mask:
                    ids = [t for t, m in zip(ids, mask) if m]
                    labels = [t for t, m in zip(labels, mask) if m]
                if max_length is not None:
                    ids, labels = ids[:max_length], labels[:max_length]
                out_ids.append(ids)
                out_labels.append(labels)
            return {"input_ids": out_ids, "labels": out_labels}

        ds = ds.map(fix, batched=True, batch_size=512)
    ds = ds.select_columns(["input_ids", "labels"])
    if stats.fully_masked_rows:
        ds = ds.filter(lambda b: [any(t != IGNORE_INDEX for t in row) for row in b["labels"]], batched=True)
    return ds
