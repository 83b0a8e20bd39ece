"""Rows of dicts as plain-text, column-aligned tables (for a terminal or a log).

One formatter for every text table (the run summary's probe results, the probes' own tables); it lives
here, below ops, probes and views alike, so none of them imports another for it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def format_table(rows: Sequence[Mapping[str, Any]], *, float_format: str | None = None, empty: str = "") -> str:
    """A header line, a rule of dashes, one line per row; columns in order of first appearance.

    None shows as a blank cell; ``float_format`` (e.g. ``".1f"``) formats floats, else ``str``;
    ``empty`` is what no rows give.
    """
    if not rows:
        return empty
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(c), float_format) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The run summary's table of probe results (the manifest keeps the rows): floats to one decimal,
    ``(no results)`` when there are none."""
    return format_table(rows, float_format=".1f", empty="(no results)")


def _cell(value: Any, float_format: str | None) -> str:
    if value is None:
        return ""
    if float_format is not None and isinstance(value, float):
        return format(value, float_format)
    return str(value)
