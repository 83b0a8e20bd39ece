"""Row ids of a source read: each row's ``id`` (the id column's value, or the row number), checked for
repeats across every batch of the read in a few bytes an id."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

from specdsl.errors import RunError

Rows = list[dict[str, Any]]


class IdAssigner:
    """Gives each row a string ``id`` (the id column's value, or the row number) across the batches of one
    read, and refuses an id that repeats: ids key caches and reports.

    Given ``reread`` (the source's records again, from the start), it remembers each id as a 64-bit hash
    in sorted numpy arrays (8 bytes an id, where a set of strings takes ~80: at 5M rows the set was half
    of a pipeline's peak memory). A hash seen before is confirmed exactly by reading the ids before it
    again: a real repeat raises, two ids that merely share a hash (about one read in a million at 5M
    ids) pass. Without ``reread`` the ids are kept in a set.
    """

    def __init__(self, id_column: str | None, display: str,
                 reread: Callable[[], Iterator[dict[str, Any]]] | None = None,
                 hash_id: Callable[[str], int] = hash):
        self.key, self.display = id_column or "id", display
        self.explicit = bool(id_column)
        self.reread, self.hash_id = reread, hash_id
        self.seen: set[str] = set()
        self.hashes = _SortedHashes()
        self.count = 0

    def assign(self, rows: Rows) -> Rows:
        out: Rows = []
        try:
            for row in rows:
                row = dict(row)
                value = row.get(self.key)
                if value is None and (self.key in row or self.explicit):
                    # A row without its id would be keyed by its row number: a silent clash with another id.
                    raise RunError(f"{self.display}: row {self.count + len(out) + 1} has no value in the id "
                                   f"column '{self.key}'", hint="give every row an id, or drop `id:` to number the rows")
                row["id"] = str(value) if value is not None else str(self.count + len(out))
                if self.reread is None:
                    self._check_in_set(row["id"])
                out.append(row)
        finally:
            if self.reread is not None:
                self._check_hashes([r["id"] for r in out])  # the rows before a missing id first, as before
            self.count += len(out)
        return out

    def _check_in_set(self, row_id: str) -> None:
        if row_id in self.seen:
            raise self._repeat(row_id)
        self.seen.add(row_id)

    def _check_hashes(self, ids: list[str]) -> None:
        import numpy as np

        hashes = np.fromiter(map(self.hash_id, ids), dtype=np.int64, count=len(ids))
        for i in np.flatnonzero(self.hashes.add(hashes)):
            self._confirm(ids[i], self.count + int(i))

    def _confirm(self, row_id: str, index: int) -> None:
        """Raise if ``row_id`` is the id of a row before row ``index`` (read again from the start)."""
        for position, record in enumerate(itertools.islice(self.reread(), index)):
            value = record.get(self.key)
            if (str(value) if value is not None else str(position)) == row_id:
                raise self._repeat(row_id)

    def _repeat(self, row_id: str) -> RunError:
        return RunError(f"{self.display}: id '{row_id}' appears more than once",
                        hint="ids identify rows in caches and reports; make them unique")


class _SortedHashes:
    """A set of int64 hashes as a few sorted numpy arrays of halving sizes (merged like a binary counter,
    so adding n hashes costs O(n log n) in all and a lookup O(log^2 n))."""

    def __init__(self) -> None:
        self.levels: list[Any] = []

    def add(self, hashes: Any) -> Any:
        """Add ``hashes``; return a mask of those seen before (in earlier calls or earlier in ``hashes``)."""
        import numpy as np

        seen = np.zeros(len(hashes), dtype=np.bool_)
        if not len(hashes):
            return seen
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        seen[order[1:][ordered[1:] == ordered[:-1]]] = True  # repeats within the batch, after the first
        for level in self.levels:
            at = np.searchsorted(level, hashes)
            seen |= level[np.minimum(at, len(level) - 1)] == hashes
        # A hash may sit in a level twice (a collision confirmed as two ids): harmless for lookups, and
        # merging without np.unique keeps the merge's scratch memory at one copy of the level.
        self.levels.append(ordered)
        while len(self.levels) > 1 and len(self.levels[-1]) * 2 >= len(self.levels[-2]):
            newer, older = self.levels.pop(), self.levels.pop()
            merged = np.concatenate((older, newer))
            del older, newer
            merged.sort(kind="stable")  # two sorted runs: timsort merges them in one pass
            self.levels.append(merged)
        return seen
