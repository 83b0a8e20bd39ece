"""``map``: add columns rendered from templates over each row."""

from __future__ import annotations

from specdsl.errors import RunError
from specdsl import templates
from specdsl.contract.ops import (COLUMN, STEP_REF, TEMPLATE, Batch, CheckContext, Rows, RunContext, StepOp,
                                  obj_schema)


class MapOp(StepOp):
    row_parallel = True  # stateless per row: an executor may split the rows
    name = "map"
    description = "add (or replace) columns rendered from templates"
    reads_known = True
    params_schema = obj_schema({
        "from": STEP_REF,
        "columns": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": COLUMN["pattern"]},
                    "additionalProperties": TEMPLATE, "description": "new column -> template"},
    }, required=["from", "columns"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        cols = list(ctx.columns)
        for name, text in (ctx.params.get("columns") or {}).items():
            ctx.template(text, "columns", name)
            if name not in cols:
                cols.append(name)
        return tuple(cols)

    def run(self, ctx: RunContext) -> Rows:
        rows = ctx.rows
        try:  # a column at a time (the templates' fast path); on any error, row by row names the row
            rendered = [(name, templates.render_many(text, rows, ctx.vars))
                        for name, text in ctx.params["columns"].items()]
        except Exception:  # noqa: BLE001
            return self._run_rows(ctx)
        out = []
        for i, row in enumerate(rows):
            new = dict(row)
            for name, values in rendered:
                new[name] = values[i]
            out.append(new)
        return out

    def run_arrow(self, ctx: RunContext, batch: Batch) -> Batch | None:
        """Every column's template vectorised (specdsl.ops.vectorised) on a stored batch: the rows
        :meth:`run` gives, as the store would keep them; None when a template is not."""
        from specdsl.ops.vectorised import render_column, with_columns

        table, json_columns = batch.arrow()
        new = {}
        for name, text in ctx.params["columns"].items():
            new[name] = render_column(text, table, json_columns, ctx.vars)
            if new[name] is None:
                return None
        return Batch.from_arrow(*with_columns(table, json_columns, new))

    def _run_rows(self, ctx: RunContext) -> Rows:
        out = []
        for row in ctx.rows:
            new = dict(row)
            for name, text in ctx.params["columns"].items():
                try:
                    new[name] = templates.render(text, row, ctx.vars)
                except Exception as exc:  # noqa: BLE001
                    raise RunError(f"column '{name}': template failed on row id={row.get('id')!r}: {exc}",
                                   node=ctx.node_id,
                                   hint="fix the template for rows like this one (a `{% if %}` or `| default(...)` "
                                        "handles a missing or empty value)") from None
            out.append(new)
        return out
