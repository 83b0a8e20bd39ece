"""``concat``: stack the rows of several steps (e.g. IN2 type 1 and type 2 samples) into one table."""

from __future__ import annotations

from typing import Any, Mapping

from specdsl.contract.ops import STEP_REF, CheckContext, Estimate, Rows, RunContext, StepOp, obj_schema


class ConcatOp(StepOp):
    name = "concat"
    description = "stack rows of several steps; columns are the union (missing values are null)"
    params_schema = obj_schema({
        "from": {"type": "array", "minItems": 1, "items": STEP_REF, "description": "the steps to stack, in order"},
    }, required=["from"])

    def check(self, ctx: CheckContext) -> tuple[str, ...]:
        cols: list[str] = []
        for key in sorted(ctx.inputs, key=lambda k: int(k.split("[")[1].rstrip("]")) if "[" in k else 0):
            for c in ctx.inputs[key]:
                if c not in cols:
                    cols.append(c)
        return tuple(cols)

    def estimate(self, params: Mapping[str, Any], input_rows: int | None, services: Any) -> Estimate:
        parts = [services.input_rows(f"from[{i}]") for i in range(len(params.get("from") or []))]
        total = None if any(r is None for r in parts) else sum(parts)
        return Estimate(rows=total, rows_unknown=total is None, details={"rows": total})

    def run(self, ctx: RunContext) -> Rows:
        out: Rows = []
        seen: set[str] = set()
        for key in sorted(ctx.inputs, key=lambda k: int(k.split("[")[1].rstrip("]")) if "[" in k else 0):
            for row in ctx.inputs[key]:
                new = dict(row)
                if str(new.get("id")) in seen:  # keep ids unique: they key caches and reports
                    new["id"] = f"{key}:{new.get('id')}"
                seen.add(str(new["id"]))
                out.append(new)
        return out
