"""Two transform ops: ``stats`` (add length columns) and ``dedupe`` (drop repeated rows).

Both follow :class:`specdsl.contract.ops.StepOp`: a strict ``params_schema`` (so a typo is a positioned
S104 error), a ``check`` that runs at compile time and returns the output columns (so later templates
are checked against them), and a ``run`` that maps input rows to output rows.
"""

from __future__ import annotations

from typing import Any

from specdsl.contract.ops import COLUMN, STEP_REF, CheckContext, Rows, RunContext, StepOp, obj_schema

MEASURES = ("chars", "words", "lines")


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def measure(text: str, what: str) -> int:
    if what == "chars":
        return len(text)
    if what == "words":
        return len(text.split())
    if what == "lines":
        return len(text.splitlines())
    raise ValueError(what)


class StatsOp(StepOp):
    """``stats: {from: STEP, column: text}`` adds ``text_chars``, ``text_words`` and ``text_lines``."""

    name = "stats"
    version = "1"
    description = "add character, word and line counts of a column"
    reads_known = True    # the columns it reads are exactly those passed to ctx.column()
    row_parallel = True   # stateless per row: an executor (Ray) may split the rows into chunks
    params_schema = obj_schema({
        "from": STEP_REF,
        "column": {**COLUMN, "description": "the text column to measure"},
        "prefix": {**COLUMN, "description": "name of the new columns: PREFIX_chars, ... (default: the column)"},
        "measures": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": list(MEASURES)},
                     "description": "which counts to add (default: all of chars, words, lines)"},
    }, required=["from", "column"])

    @staticmethod
    def new_columns(params) -> list[str]:
        prefix = params.get("prefix") or params.get("column")
        return [f"{prefix}_{m}" for m in params.get("measures", MEASURES)]

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        ctx.column(ctx.params.get("column"), "column")
        cols = list(ctx.columns)
        key = "prefix" if "prefix" in ctx.params else "column"
        new = self.new_columns(ctx.params)
        clash = [c for c in new if c in cols]
        if clash:
            names = ", ".join(f"'{c}'" for c in clash)
            ctx.error("S401", f"column{'s' if len(clash) > 1 else ''} {names} already exist"
                      f"{'' if len(clash) > 1 else 's'}; stats would overwrite "
                      f"{'them' if len(clash) > 1 else 'it'}", key, hint="choose another `prefix:`")
        return tuple(cols + [c for c in new if c not in cols])

    def run(self, ctx: RunContext) -> Rows:
        p = ctx.params
        measures = p.get("measures", MEASURES)
        prefix = p.get("prefix") or p["column"]
        out = []
        for row in ctx.rows:
            text = _text(row.get(p["column"]))
            out.append({**row, **{f"{prefix}_{m}": measure(text, m) for m in measures}})
        return out


class DedupeOp(StepOp):
    """``dedupe: {from: STEP, columns: [question]}`` keeps the first row of each distinct value."""

    name = "dedupe"
    version = "1"
    description = "drop rows whose values in the given columns repeat an earlier row's"
    reads_known = True
    drops_rows = True     # plan estimates downstream of it are upper bounds
    params_schema = obj_schema({
        "from": STEP_REF,
        "columns": {"type": "array", "minItems": 1, "uniqueItems": True, "items": COLUMN,
                    "description": "rows are duplicates when all of these columns are equal"},
        "normalize": {"type": "boolean",
                      "description": "compare case-folded text with whitespace collapsed (default: false)"},
        "keep": {"enum": ["first", "last"], "description": "which of the duplicates to keep (default: first)"},
    }, required=["from", "columns"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        for i, name in enumerate(ctx.params.get("columns") or []):
            ctx.column(name, "columns", i)
        return ctx.columns

    def run(self, ctx: RunContext) -> Rows:
        p = ctx.params
        cols, normalize = p["columns"], p.get("normalize", False)

        def key(row):
            values = []
            for c in cols:
                v = row.get(c)
                if normalize and isinstance(v, str):
                    v = " ".join(v.casefold().split())
                values.append(repr(v))  # repr: 1 and "1" stay distinct, lists and dicts hash
            return tuple(values)

        rows = ctx.rows if p.get("keep", "first") == "first" else list(reversed(ctx.rows))
        seen: set[tuple] = set()
        kept = []
        for row in rows:
            k = key(row)
            if k in seen:
                continue
            seen.add(k)
            kept.append(row)
        if p.get("keep", "first") == "last":
            kept.reverse()  # keep the input order of the surviving rows
        return kept
