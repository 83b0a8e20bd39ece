"""``filter``: keep rows whose answer matches the gold answer, or whose `where` template renders truthy."""

from __future__ import annotations

from typing import Any, Mapping

from specdsl import templates
from specdsl.execute.columns import bool_array
from specdsl.errors import RunError
from specdsl.contract.ops import (COLUMN, STEP_REF, TEMPLATE, Batch, CheckContext, Rows, RunContext, StepOp,
                                  obj_schema)

MATCH_SCHEMA = {
    "type": "object",
    "required": ["field", "gold"],
    "additionalProperties": False,
    "description": "compare an answer column with a gold column",
    "properties": {
        "field": {**COLUMN, "description": "the column holding the model's answer"},
        "gold": {**COLUMN, "description": "the column holding the gold answer"},
        "rule": {"enum": ["exact", "contains", "regex", "number"], "description": "how to compare (default: exact)"},
        "pattern": {"type": "string", "description": "for rule: regex, a pattern whose first group is the answer"},
    },
}
FALSY = ("", "false", "0", "none", "no")


def is_truthy(text: str) -> bool:
    return text.strip().lower() not in FALSY


class FilterOp(StepOp):
    row_parallel = True  # stateless per row: an executor may split the rows
    name = "filter"
    description = "keep the rows that match (answer matchers or a template condition)"
    template_keys = ("where",)
    reads_known = True
    params_schema = obj_schema({
        "from": STEP_REF,
        "match": MATCH_SCHEMA,
        "where": {**TEMPLATE, "description": "keep rows where this renders truthy"},
        "keep": {"enum": ["matched", "unmatched"], "description": "which rows to keep (default: matched)"},
        "into": {**COLUMN, "description": "instead of dropping rows, write the verdict (true/false) into this column"},
    }, required=["from"])

    @staticmethod
    def drops_rows(params: Mapping[str, Any]) -> bool:
        """A filter with `into:` writes its verdict into a column and keeps every row."""
        return not params.get("into")

    # Without `into:` its rows are some of its input's, unchanged: the push-filters pass may run it earlier.
    selects_rows = drops_rows

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        p = ctx.params
        if not p.get("match") and not p.get("where"):
            ctx.error("S101", "filter needs `match:` or `where:`",
                      hint="keep rows where a template is true (where: \"{{ row.score > 3 }}\"), or where a "
                           "column matches the gold answer (match: {field: ..., gold: ...})")
        m = p.get("match") or {}
        if m:
            ctx.column(m.get("field"), "match", "field")
            ctx.column(m.get("gold"), "match", "gold")
            if m.get("rule") == "regex":
                if not m.get("pattern"):
                    ctx.error("S101", "rule: regex needs `pattern:`", "match",
                              hint="add the regular expression: pattern: \"\\\\d+\"")
                else:
                    problem = templates.regex_problem(m["pattern"])  # bad, or exponential on a near-miss
                    if problem:
                        ctx.error("S105", problem, "match", "pattern",
                                  hint="fix the pattern; avoid repeating a group that holds `+` or `*`")
        if p.get("into"):
            return tuple(ctx.columns) + (p["into"],)
        return ctx.columns

    def run(self, ctx: RunContext) -> Rows:
        from specdsl.designs.matchers import match_answer

        p = ctx.params
        m = p.get("match")
        want = p.get("keep", "matched") == "matched"
        rows = ctx.rows
        try:  # matchers, then `where` on the rows still in, a template at a time (the fast path)
            verdicts = [row.get(m["field"]) is not None and match_answer(
                m.get("rule", "exact"), row.get(m["field"]), row.get(m["gold"]), pattern=m.get("pattern"))
                for row in rows] if m else [True] * len(rows)
            if p.get("where"):
                candidates = [row for row, verdict in zip(rows, verdicts) if verdict]
                rendered = iter(templates.render_many(p["where"], candidates, ctx.vars))
                verdicts = [verdict and is_truthy(next(rendered)) for verdict in verdicts]
        except Exception:  # noqa: BLE001 - row by row, which names the failing row
            return self._run_rows(ctx)
        if p.get("into"):
            return [{**row, p["into"]: verdict} for row, verdict in zip(rows, verdicts)]
        return [row for row, verdict in zip(rows, verdicts) if verdict == want]

    def run_arrow(self, ctx: RunContext, batch: Batch) -> Batch | None:
        """A ``where:``-only filter whose condition is vectorised (specdsl.ops.vectorised), on a stored
        batch: the rows :meth:`run` keeps, as the store would keep them; None for any other filter."""
        import pyarrow as pa

        from specdsl.ops.vectorised import as_stored, condition_mask, with_columns

        p = ctx.params
        if p.get("match") or not p.get("where"):
            return None
        table, json_columns = batch.arrow()
        mask = condition_mask(p["where"], table, json_columns, ctx.vars)
        if mask is None:
            return None
        if p.get("into"):
            return Batch.from_arrow(*with_columns(table, json_columns, {p["into"]: bool_array(mask)}))
        keep = mask if p.get("keep", "matched") == "matched" else ~mask
        return Batch.from_arrow(*as_stored(table.filter(bool_array(keep)), json_columns))

    def _run_rows(self, ctx: RunContext) -> Rows:
        from specdsl.designs.matchers import match_answer

        p = ctx.params
        m = p.get("match")
        want = p.get("keep", "matched") == "matched"
        out = []
        for row in ctx.rows:
            verdict = True
            try:
                if m:
                    verdict = row.get(m["field"]) is not None and match_answer(
                        m.get("rule", "exact"), row.get(m["field"]), row.get(m["gold"]), pattern=m.get("pattern"))
                if verdict and p.get("where"):
                    verdict = is_truthy(templates.render(p["where"], row, ctx.vars))
            except Exception as exc:  # noqa: BLE001
                raise RunError(f"filter failed on row id={row.get('id')!r}: {exc}", node=ctx.node_id,
                               hint="fix the template for rows like this one (a `{% if %}` or `| default(...)` handles "
                                    "a missing or empty value)") from None
            if p.get("into"):
                out.append({**row, p["into"]: verdict})
            elif verdict == want:
                out.append(row)
        return out
